"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

Locally aware patch features from two levels of a frozen ImageNet backbone form
a memory bank of normal patches, thinned by a greedy k-center coreset; a query
patch scores its distance to the nearest bank patch. The bank is built from
the reference images, so :meth:`PatchCore.set_reference` adapts the detector to
a new domain without any training, replacing the bank (the training patches are
dropped).
"""

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ._backbone import backbone_constraints, create_backbone, join_levels
from ._docstrings import fill_doc
from ._layers import adaptive_average, neighbourhoods
from ._maps import adjacent, grid_to_map
from ._params import DEPRECATED, Ints, Reals, Sequences, deprecated
from ._progress import progress
from ._random import seed_from
from .base import BaseDetector, is_exporting, row_blocks

__all__ = ["PatchCore", "augmented_bank", "euclidean", "farthest_patch", "greedy_coreset",
           "locally_aware_features", "nearest", "nearest_in_bank", "nearest_outside",
           "reduced_features", "reweighted_score", "reweighted_scores"]

# elements of one distance block (128 MiB of float32): bounds memory whatever the bank size
_BLOCK = 2**25
# greedy coreset: farthest points whose order is settled among themselves per pass over the
# features, principal directions of the distance lower bound, feature rows per update chunk
_CANDIDATES = 512
_BASIS = 32
_ROWS = 4096
# farthest_patch: rows searched exactly per bank prefix; relative rounding allowed for
_N_EXACT = 8
_BOUND_SLACK = 1e-3
# leave-one-out search: query rows and bank rows per block of squared distances (8 MiB of
# float32, in the cache; measured fastest on the CPU)
_CACHE_ROWS = 1024
_CACHE_COLUMNS = 2048
# leave-one-out map maxima: grids upsampled and smoothed at a time (at 256 px, 4 MiB of maps
# and 30 MiB of convolution buffers; 64 took 200 MiB)
_MAP_BATCH = 16


def greedy_coreset(features, n_select, projection_dim=128, generator=None, chunk_size=None,
                   verbose=0):
    """Indices of a greedy k-center coreset (paper Alg. 1) on a random projection.

    The projection (Johnson-Lindenstrauss) only speeds up the distance
    computations; the selected rows index ``features`` itself. The selection
    is that of the plain algorithm (each step takes the point farthest from
    those chosen, the first of equals), computed in passes over the features
    rather than one pass per step (see :func:`_farthest_first`).

    Parameters
    ----------
    features : torch.Tensor of shape (n, dim)
        Floating point, on any device; not modified.
    n_select : int
        Number of rows to select; all rows (in order) when ``n_select >= n``.
    projection_dim : int, default=128
        Dimension of the random projection; 0 or ``>= dim`` uses the features.
    generator : torch.Generator, optional
        Draws the projection, the chunks and the starting rows.
    chunk_size : int, optional
        An approximation for large ``n``: the rows are split at random into
        ``ceil(n / chunk_size)`` chunks of equal size (:func:`_chunks`), each
        gets its share of ``n_select`` and is thinned on its own. Each chunk's
        selection is the exact greedy one of that chunk, but the chunks'
        selections do not see each other: the union covers every row within
        the largest of the chunks' covering radii, not the exact coreset's
        radius. Time grows as ``n * chunk_size`` instead of ``n ** 2``. None
        (or ``n <= chunk_size``): exact.
    verbose : int, default=0
        A progress bar on stderr when > 0.

    Returns
    -------
    selected : torch.Tensor of shape (n_select,)
        Row indices on the CPU, in the order they were chosen (with chunks:
        every chunk's first, then every chunk's second, ...), so that every
        prefix covers the rows coarsely (:func:`farthest_patch` relies on it).

    Notes
    -----
    Memory, besides the features: ``n * (projection_dim + _BASIS + 2)``
    values of the features' dtype (the projection); with chunks, those of
    one chunk at a time and a copy of its rows, ``chunk_size * (dim +
    projection_dim + _BASIS + 2)``. Time: O(n * n_select) pairs
    (O(chunk_size * n_select) with chunks), most of them rejected by a
    lower bound in ``_BASIS`` dimensions.
    """
    n, dim = features.shape
    if n_select >= n:
        return torch.arange(n)
    proj = None
    if projection_dim and dim > projection_dim:
        proj = torch.randn(dim, projection_dim, generator=generator) / projection_dim**0.5
        proj = proj.to(features.device, features.dtype)

    def project(x):
        return x if proj is None else x @ proj

    if chunk_size is None or n <= chunk_size:
        start = int(torch.randint(n, (1,), generator=generator))
        return _farthest_first(project(features), n_select, start, verbose=verbose)
    chunks = _chunks(n, chunk_size, generator)
    # shares of n_select in proportion to the chunks' sizes, summing to n_select
    ends = np.round(n_select * np.cumsum([len(rows) for rows in chunks]) / n).astype(int)
    picks, ranks = [], []
    for j, (rows, share) in enumerate(zip(chunks, np.diff(ends, prepend=0))):
        start = int(torch.randint(len(rows), (1,), generator=generator))
        # one chunk projected at a time: its memory, not the whole projection's
        local = _farthest_first(project(features[rows.to(features.device)]), max(1, int(share)),
                                start, desc=f"coreset {j + 1}/{len(chunks)}", verbose=verbose)
        picks.append(rows[local])
        ranks.append(torch.arange(len(local)))
    return torch.cat(picks)[torch.argsort(torch.cat(ranks), stable=True)]


def _chunks(n, chunk_size, generator):
    """A random partition of ``range(n)`` into ``ceil(n / chunk_size)`` sorted parts of equal size."""
    n_chunks = -(-n // chunk_size)
    perm = torch.randperm(n, generator=generator)
    return [torch.sort(perm[j::n_chunks]).values for j in range(n_chunks)]


def _farthest_first(x, n_select, start, desc="coreset", verbose=0):
    """Greedy farthest-first traversal of the rows of ``x`` from row ``start``.

    The plain algorithm updates the distance of every row to the chosen set
    after every step: ``n_select`` passes over ``x``, each bound by memory
    bandwidth. Here each pass settles many steps at once:

    1. The ``_CANDIDATES`` rows farthest from the chosen set are the only
       ones that can be chosen next while their distance stays above that of
       every other row (which only decreases); their distances to each other
       settle the next steps exactly (:func:`_next_steps`).
    2. One pass then updates every row's distance to the new centres. A pair
       is computed only if its lower bound, the distance of the projections
       on the ``_BASIS`` leading principal directions (a matrix product),
       does not already exceed the row's distance (:func:`_update_distances`).

    Distances of the pairs computed are those of the plain algorithm, bit
    for bit (the same difference and norm), so the selection is the same.
    """
    n, dim = x.shape
    mean, basis = _principal_basis(x, min(_BASIS, dim))
    # [z, 1] and |z|^2 turn the bound |z_x - z_c|^2 into one product with [-2 z_c, |z_c|^2]
    z = torch.addmm(-(mean @ basis)[None], x, basis)
    z_sq = (z * z).sum(dim=1)
    z = torch.cat([z, torch.ones_like(z[:, :1])], dim=1)
    # rounding of the product form, far above the dtype's precision: a pair is skipped
    # only when its bound exceeds the row's distance by more than this (squared)
    radius_sq = float(((x[:: max(1, n // 65536)] - mean) ** 2).sum(dim=1).max())
    slack = 4096 * torch.finfo(x.dtype).eps * radius_sq
    min_dist = _distances(x, x[start])
    selected = [torch.tensor([start])]
    workspace = {}  # _update_distances's buffers, from one pass to the next
    bar = progress(range(n_select), desc=desc, verbose=verbose, unit="patch")
    next(bar, None)
    n_done = 1
    while n_done < n_select:
        picks = _next_steps(x, min_dist, n_select - n_done)
        _update_distances(x, z, z_sq, min_dist, picks, slack, workspace)
        selected.append(picks.cpu())
        n_done += len(picks)
        for _ in zip(range(len(picks)), bar):
            pass
    next(bar, None)  # the last step done: the bar counts it and closes
    return torch.cat(selected)


def _principal_basis(x, n_basis):
    """Mean and ``n_basis`` leading principal directions ``(dim, n_basis)`` of the rows of ``x``.

    Any orthonormal basis gives a valid lower bound; the principal one gives
    the tightest. Computed in float64 on at most 65536 evenly spaced rows.
    """
    sample = x[:: max(1, len(x) // 65536)].double()
    mean = sample.mean(dim=0)
    centred = sample - mean
    _, vectors = torch.linalg.eigh(centred.T @ centred)
    return mean.to(x.dtype), vectors[:, -n_basis:].to(x.dtype).contiguous()


def _distances(x, centre):
    """``|x_i - centre|`` for every row, in chunks (no temporary of the size of ``x``)."""
    out = torch.empty(len(x), dtype=x.dtype, device=x.device)
    for s in range(0, len(x), 16 * _ROWS):
        out[s:s + 16 * _ROWS] = torch.linalg.vector_norm(x[s:s + 16 * _ROWS] - centre, dim=1)
    return out


def _next_steps(x, min_dist, n_left):
    """The next greedy steps that the ``_CANDIDATES`` farthest rows settle on their own.

    The first step is the farthest row. Every later one is the farthest
    candidate after the steps before it, as long as its distance stays above
    ``tau``, the largest distance outside the candidates (lower ties could be
    rows outside). Returns up to ``n_left`` row indices, in order.
    """
    n_cand = min(_CANDIDATES, len(x) - 1)
    top = torch.topk(min_dist, n_cand + 1)
    tau = float(top.values[-1])
    first = torch.argmax(min_dist)[None]  # the first of equals, as the plain algorithm
    cand = torch.cat([first, top.indices[:-1]])
    xc = x[cand]
    rows = max(1, 2**20 // xc.numel())  # (rows, n_cand, dim) difference blocks of 4 MiB
    between = torch.cat([torch.linalg.vector_norm(xc[None] - xc[i:i + rows, None], dim=2)
                         for i in range(0, len(xc), rows)]).cpu().double().numpy()
    dist = min_dist[cand].cpu().double().numpy()  # float64 holds every dtype's values exactly
    index = cand.cpu().numpy()
    steps = [0]
    np.minimum(dist, between[0], out=dist)
    while len(steps) < n_left:
        far = dist.max()
        if not far > tau:
            break
        ties = np.flatnonzero(dist == far)
        step = ties[np.argmin(index[ties])]
        steps.append(step)
        np.minimum(dist, between[step], out=dist)
    return cand[torch.as_tensor(steps, device=cand.device)]


def _update_distances(x, z, z_sq, min_dist, picks, slack, workspace):
    """``min_dist = min(min_dist, |x - x[picks]|)`` for the pairs the lower bound cannot rule out.

    ``z`` is ``[projection on the basis, 1]`` per row and ``z_sq`` the squared
    norm of the projection: ``z @ [-2 z_c, |z_c|^2]^T + z_sq`` is the squared
    distance of the projections, which is at most the squared distance. The
    bounds, their test and the differences of the pairs go into buffers kept
    in ``workspace`` from one pass to the next (see :func:`nearest_outside`
    on the allocator).
    """
    zc = z[picks, :-1]
    weights = torch.cat([-2 * zc, (zc * zc).sum(dim=1, keepdim=True)], dim=1).T.contiguous()
    xc = x[picks]
    block = min(_ROWS, len(x)) * len(picks)
    bound_buf = _buffer(workspace, "bound", block, z.dtype, z.device)
    test_buf = _buffer(workspace, "test", block, torch.bool, z.device)
    for s in range(0, len(x), _ROWS):
        dist = min_dist[s:s + _ROWS]
        bound = torch.mm(z[s:s + _ROWS], weights, out=bound_buf[:len(dist) * len(picks)]
                         .view(len(dist), len(picks)))
        limit = dist * dist + slack - z_sq[s:s + _ROWS]
        test = torch.le(bound, limit[:, None], out=test_buf[:bound.numel()].view(bound.shape))
        rows, cols = test.nonzero(as_tuple=True)
        if len(rows):
            # the differences in one buffer: index_select and an in-place subtraction take
            # half the time of x[s + rows] - xc[cols], with the same values
            size = (len(rows), x.shape[1])
            diff = torch.index_select(x, 0, s + rows, out=_buffer(
                workspace, "rows", len(rows) * size[1], x.dtype, x.device)[:size[0] * size[1]]
                .view(size))
            diff.sub_(torch.index_select(xc, 0, cols, out=_buffer(
                workspace, "centres", len(rows) * size[1], x.dtype, x.device)[:size[0] * size[1]]
                .view(size)))
            dist.scatter_reduce_(0, rows, torch.linalg.vector_norm(diff, dim=1), "amin")


def euclidean(x1, x2):
    """Euclidean distances between the rows of ``x1 (n, dim)`` and ``x2 (m, dim)``: ``(n, m)``.

    ``torch.cdist`` by matrix products (``|x|^2 - 2 x.y + |y|^2``), the way it
    computes whenever ``n`` or ``m`` exceeds 25 (every bank of real images): the
    same formula for any number of rows, so that a graph of it
    (:mod:`skad._onnx`) holds for any batch size.
    """
    return torch.cdist(x1, x2, compute_mode="use_mm_for_euclid_dist")


def nearest(queries, bank, excluded=None):
    """Distance to, and index of, the nearest bank row for each query row, in blocks.

    ``excluded(rows) -> bool (len(rows) or 1, len(bank))`` masks bank rows a
    query may not match (its own image's patches, for leave-one-out scores);
    ``rows`` is a slice of the query rows, or their indices.
    """
    dists, index = [], []
    for rows in row_blocks(queries.shape[0], max(1, _BLOCK // max(len(bank), 1))):
        d = euclidean(queries[rows], bank)
        if excluded is not None:
            d.masked_fill_(excluded(rows), float("inf"))
        dmin, imin = d.min(dim=1)
        dists.append(dmin)
        index.append(imin)
    return torch.cat(dists), torch.cat(index)


def nearest_in_bank(queries, bank):
    """:func:`nearest` for scoring, searched as :func:`nearest_outside`.

    The distance of every query row to its nearest bank row and that row's
    index, with no row left out: squared distances in cache-sized blocks and
    the square root of the minima only: 1.8 to 3 times as fast as :func:`nearest`
    on one CPU thread (4,096 queries against banks of 3,072 to 61,440 rows;
    docs/benchmarks.md, "The nearest-neighbour search"). The squared
    distances are :func:`nearest`'s to rounding (the blocks' products may round
    differently), so a query equal to a bank row may get 0 where :func:`nearest`
    gets the square root of a rounding error, about 1e-3. On a GPU, where one
    large product beats many small ones, and under ``torch.export``
    (:mod:`skad._onnx`), whose graph must hold for any batch size, it is
    :func:`nearest`.
    """
    if is_exporting() or queries.device.type != "cpu":
        return nearest(queries, bank)
    no_rows = torch.empty(0, dtype=torch.long, device=queries.device)
    return nearest_outside(queries, augmented_bank(bank), no_rows)


def nearest_outside(queries, bank_aug, rows_out, workspace=None):
    """:func:`nearest` with the bank rows ``rows_out`` (sorted) excluded for every query row.

    ``bank_aug`` is :func:`augmented_bank` of the bank. The distances are
    those of :func:`euclidean` (``|x|^2 - 2 x.y + |y|^2`` in one matrix
    product, as ``torch.cdist`` computes it), but the exclusion and the
    minimum work on the squared distances and the square root is taken of the
    minima only, and the bank is searched in blocks of ``_CACHE_COLUMNS`` rows
    that keep the block of products in the cache while its minimum is taken
    (a block of ``queries x bank`` goes to memory and back: 1.5 times slower
    on the CPU). The square root being monotone, the distances are those of
    :func:`nearest`; of bank rows within rounding of each other, the index
    may name another one.

    The blocks are written into buffers kept in ``workspace`` (a dict, reused
    by the next call that passes it): thousands of blocks of a few MiB
    allocated and freed between small tensors left the C allocator's heap
    fragmented, 850 MiB more resident memory for the leave-one-out scores
    of 240 images (docs/benchmarks.md, "PatchCore fit").
    """
    n, dim = queries.shape
    n_bank = len(bank_aug)
    ws = {} if workspace is None else workspace
    block_rows, block_cols = min(_CACHE_ROWS, n), min(_CACHE_COLUMNS, n_bank)
    products = _buffer(ws, "products", block_rows * block_cols, queries.dtype, queries.device)
    x_aug = _buffer(ws, "x_aug", block_rows * (dim + 2), queries.dtype, queries.device)
    squares = _buffer(ws, "squares", block_rows * dim, queries.dtype, queries.device)
    dmin = _buffer(ws, "dmin", block_rows, queries.dtype, queries.device)
    imin = _buffer(ws, "imin", block_rows, torch.long, queries.device)
    starts = range(0, n_bank, _CACHE_COLUMNS)
    # the rows left out of each block of the bank, found once (no device sync per block)
    cuts = torch.searchsorted(rows_out.cpu(), torch.tensor([*starts, n_bank])).tolist()
    dists = torch.full((n,), float("inf"), dtype=queries.dtype, device=queries.device)
    index = torch.zeros(n, dtype=torch.long, device=queries.device)
    for rows in row_blocks(n, _CACHE_ROWS):
        x = queries[rows]
        r = len(x)
        # [-2 x, |x|^2, 1], as euclidean's product has it (the same operations)
        xa = x_aug[:r * (dim + 2)].view(r, dim + 2)
        torch.mul(x, -2, out=xa[:, :dim])
        torch.sum(torch.pow(x, 2, out=squares[:r * dim].view(r, dim)), dim=1, keepdim=True,
                  out=xa[:, dim:dim + 1])
        xa[:, dim + 1:].fill_(1)
        best, arg = dists[rows], index[rows]
        for start, lo, hi in zip(starts, cuts, cuts[1:]):
            part = bank_aug[start:start + _CACHE_COLUMNS]
            d_sq = products[:r * len(part)].view(r, len(part))
            torch.mm(xa, part.T, out=d_sq)
            d_sq.index_fill_(1, rows_out[lo:hi] - start, float("inf"))
            torch.min(d_sq, dim=1, out=(dmin[:r], imin[:r]))
            closer = dmin[:r] < best  # strictly: the first of equals, as one minimum over all
            arg[closer] = imin[:r][closer] + start
            torch.minimum(best, dmin[:r], out=best)
        best.clamp_min_(0).sqrt_()
    return dists, index


def _buffer(workspace, name, numel, dtype, device):
    """A flat buffer of at least ``numel`` elements, kept in ``workspace`` under ``name``
    (grown by half at least when too small, so that growing sizes rarely reallocate)."""
    buf = workspace.get(name)
    if buf is None or buf.dtype != dtype or buf.device != device:
        buf = workspace[name] = torch.empty(numel, dtype=dtype, device=device)
    elif buf.numel() < numel:
        buf = workspace[name] = torch.empty(max(numel, buf.numel() * 3 // 2), dtype=dtype,
                                            device=device)
    return buf


def augmented_bank(bank):
    """``[bank, 1, |bank|^2]``, the bank's side of :func:`euclidean`'s matrix product."""
    sq = bank.pow(2).sum(dim=1, keepdim=True)
    return torch.cat([bank, torch.ones_like(sq), sq], dim=1)


def _rows_by_image(owner, n_images):
    """For each image ``0 .. n_images - 1``, the bank rows it owns (``owner`` of each row)."""
    order = torch.argsort(owner, stable=True)
    return list(order.split(torch.bincount(owner, minlength=n_images).tolist()))


def _reweighted_scores_outside(farthest, s_star, m_star, bank, rows_out, n_neighbors):
    """:func:`reweighted_score` of many images, each with its own bank rows left out.

    ``farthest (B, dim)`` is each image's farthest patch, ``s_star`` and
    ``m_star (B,)`` its distance to and index of its nearest allowed bank row,
    ``rows_out`` the B index tensors of the bank rows each image may not use.
    The images whose allowed rows are at least ``n_neighbors`` are reweighted
    in blocks of rows; the others one by one, as :func:`reweighted_score` does.
    """
    scores = s_star.clone()
    if n_neighbors < 2:
        return scores
    n_allowed = torch.tensor([len(bank) - len(r) for r in rows_out])
    wide = torch.nonzero(n_allowed >= n_neighbors)[:, 0].tolist()
    for start in range(0, len(wide), max(1, _BLOCK // len(bank))):
        block = wide[start:start + max(1, _BLOCK // len(bank))]
        d_bank = euclidean(bank[m_star[block]], bank)
        for r, i in enumerate(block):
            d_bank[r, rows_out[i]] = float("inf")
        d_bank[torch.arange(len(block)), m_star[block]] = 0.0
        scores[block] = _density_weight(farthest[block, None], d_bank, bank,
                                        n_neighbors) * s_star[block]
    for i in torch.nonzero(n_allowed < n_neighbors)[:, 0].tolist():
        def excluded(rows, i=i):
            mask = torch.zeros(1, len(bank), dtype=torch.bool, device=bank.device)
            mask[0, rows_out[i]] = True
            return mask
        scores[i] = reweighted_score(farthest[i][None], 0, s_star[i], m_star[i], bank,
                                     n_neighbors, excluded)
    return scores


def farthest_patch(queries, bank, excluded=None):
    """The query row farthest from its nearest bank row, without a full search for every row.

    Returns ``(j, d[j], i[j])`` with ``d, i = nearest(queries, bank, excluded)``
    and ``j = argmax(d)`` (the first of equals) over the rows with an allowed
    bank row (``d[j]`` is inf only when no row has one). Branch and bound over the
    prefixes ``bank[:m]`` of growing size: the nearest distance within a
    prefix bounds a row's nearest distance from above, the exact distances of
    the rows with the largest bounds bound the answer from below, and rows
    whose upper bound falls below it are dropped before the next prefix.
    Correct for any bank order; fast for a bank in greedy coreset order
    (:func:`greedy_coreset`), whose prefixes cover the whole bank.

    The bounds and the answer come from different :func:`nearest` calls,
    which round alike to about 1e-6; a row is dropped only below
    ``1 - _BOUND_SLACK`` times the lower bound.
    """
    rows = torch.arange(len(queries), device=queries.device)
    lower = 0.0
    for size in _prefix_sizes(len(bank)):
        dist, index = nearest(queries[rows], bank[:size], _restrict(excluded, rows, size))
        if size == len(bank):
            break
        top = rows[torch.topk(dist, min(_N_EXACT, len(rows))).indices]
        exact, _ = nearest(queries[top], bank, _restrict(excluded, top, len(bank)))
        exact = exact[torch.isfinite(exact)]  # rows with every bank row excluded: no bound
        if len(exact):
            lower = max(lower, float(exact.max()))
        rows = rows[dist >= lower * (1 - _BOUND_SLACK)]
    j = int(torch.argmax(torch.where(torch.isfinite(dist), dist, -torch.inf)))
    return int(rows[j]), dist[j], index[j]


def _prefix_sizes(n_bank):
    """Bank prefixes searched by :func:`farthest_patch`: 1/64 and 1/8 of the bank (from 256
    rows up), then all of it."""
    return [m for m in (n_bank >> 6, n_bank >> 3) if m >= 256] + [n_bank]


def _restrict(excluded, rows, size):
    """``excluded`` for the query rows ``rows`` and the bank prefix of ``size`` rows."""
    if excluded is None:
        return None
    return lambda part: excluded(rows[part])[:, :size]


def locally_aware_features(levels):
    """Locally aware patch features (paper Eq. 2-3) from backbone levels ``(B, C_l, h_l, w_l)``.

    Each level's 3 x 3 neighbourhood average, the coarser levels upsampled to
    the first level's grid, joined along the channels: ``(B, sum C_l, h, w)``.
    """
    # zero padding counts in the average, as in the authors' code (unfold with zero
    # padding) and anomalib; averaging the border cells over fewer neighbours made
    # them the noisiest patches and set the image score (docs/methods/patchcore.md)
    return join_levels([F.avg_pool2d(f.float(), 3, stride=1, padding=1, count_include_pad=True)
                        for f in levels])


def reduced_features(levels, level_dim, target_dim):
    """Locally aware patch features of ``target_dim`` values, as the authors' released code
    computes them: ``(B, target_dim, h, w)`` from backbone levels ``(B, C_l, h_l, w_l)``.

    The paper's aggregation of a 3 x 3 neighbourhood by adaptive average pooling
    to a fixed dimension (Sec. 3.1), as amazon-science/patchcore-inspection
    implements it (``Preprocessing``, ``MeanMapper`` and ``Aggregator`` of its
    ``common.py``): each level's zero-padded neighbourhood, ``C_l x 3 x 3``
    values unfolded channel by channel (:func:`~skad._layers.neighbourhoods`),
    averaged down to ``level_dim`` values (:func:`~skad._layers.adaptive_average`;
    their ``pretrain_embed_dimension``); the coarser levels upsampled bilinearly to
    the first level's grid; the levels' values joined, level after level, and
    averaged down to ``target_dim`` (their ``target_embed_dimension``).

    The released code upsamples the unfolded values and pools them on the fine
    grid; here each level is pooled on its own grid, then upsampled: both are
    linear, one over the cells and the other over the values of a cell, so the
    order does not change the result and the coarser levels pool fewer cells.
    """
    pooled = [adaptive_average(neighbourhoods(f.float()), level_dim, dim=1) for f in levels]
    return adaptive_average(join_levels(pooled), target_dim, dim=1)


def reweighted_score(q, j, s_star, m_star, bank, n_neighbors, excluded=None):
    """Paper Eq. 7: the largest patch distance, reweighted by the bank's local density.

    ``q[j]`` is the query patch farthest from the bank: ``s_star`` from
    its nearest bank row, ``bank[m_star]`` (as :func:`farthest_patch` returns
    them). The weight comes from the ``n_neighbors`` nearest bank neighbours
    ``N_b(m*)`` of ``m*``; for leave-one-out scores, ``excluded`` (as
    :func:`nearest`) leaves the image's own bank patches out of ``N_b(m*)`` as
    well as out of the nearest-neighbour search. ``n_neighbors < 2``: ``s_star``.
    """
    d_bank = euclidean(bank[m_star][None], bank)[0]
    if excluded is not None:
        d_bank = d_bank.masked_fill(excluded(slice(j, j + 1))[0], float("inf"))
        d_bank[m_star] = 0.0
    b = min(n_neighbors, int(torch.isfinite(d_bank).sum()))
    if b < 2:
        return s_star
    return _density_weight(q[j][None, None], d_bank[None], bank, b)[0] * s_star


def reweighted_scores(q, dist, index, bank, n_neighbors):
    """:func:`reweighted_score` of a batch of images, each against the whole bank.

    Parameters
    ----------
    q : torch.Tensor of shape (B, N, dim)
        Each image's patch features.
    dist, index : torch.Tensor of shape (B, N)
        Each patch's distance to, and index of, its nearest bank row (:func:`nearest`).
    bank : torch.Tensor of shape (M, dim)
    n_neighbors : int

    Returns
    -------
    scores : torch.Tensor of shape (B,)
        Eq. 7 for each image, from its farthest patch (the first of equals).
        One batched computation, without a loop over the images, so that a
        graph of it (:mod:`skad._onnx`) takes any batch size.
    """
    j = dist.argmax(dim=1, keepdim=True)
    s_star = dist.gather(1, j)[:, 0]
    b = min(n_neighbors, len(bank))  # no bank row is excluded: all distances are finite
    if b < 2:
        return s_star
    d_bank = euclidean(bank[index.gather(1, j)[:, 0]], bank)
    farthest = q.gather(1, j[..., None].expand(-1, -1, q.shape[2]))
    return _density_weight(farthest, d_bank, bank, b) * s_star


def _density_weight(patches, d_bank, bank, b):
    """Eq. 7's weight ``1 - softmax(|m_q - N_b(m*)|)[m*]`` of ``B`` farthest patches.

    ``patches (B, 1, dim)`` are the farthest patches ``m_q``, ``d_bank (B, M)``
    the distances of their nearest bank rows ``m*`` to every bank row (inf
    where excluded); ``N_b(m*)`` are the ``b`` nearest bank rows of ``m*``,
    ``m*`` first (its own nearest). Returns ``(B,)``.
    """
    support = torch.topk(d_bank, b, largest=False).indices
    d_support = torch.linalg.vector_norm(patches - bank[support], dim=2)  # as cdist: b rows
    return 1.0 - torch.softmax(d_support, dim=1)[:, 0]


@fill_doc(progress="the coreset",
          reference_scores="Leave-one-image-out scores of the reference images.",
          calibration_cost=(
              " Scoring each reference against the bank without its own patches is the"
              " part of a fit that grows as the square of the number of references; the"
              " subset makes it grow linearly (docs/benchmarks.md, \"PatchCore fit\")."))
class PatchCore(BaseDetector):
    """PatchCore anomaly detector: nearest-neighbour distance to a coreset of normal patches.

    Parameters
    ----------
    backbone : str, default="wide_resnet50_2.tv_in1k"
        timm CNN, optionally with its pretrained tag: the paper's WideResNet-50-2 with
        torchvision's ImageNet weights, as the authors' code loads it.
    weights : "pretrained", str, path-like or None, default="pretrained"
        Backbone weights: timm's pretrained tag, another tag, a checkpoint file,
        or None (random; tests only). Resolved offline first.
    layers : tuple of int, default=(2, 3)
        Backbone levels (``features_only`` indices; ResNets: layer2, layer3).
    embedding_dim : int, (int, int) or None, default=None
        The patch features. None: the levels' full channels, each averaged over
        its 3 x 3 neighbourhood, joined (anomalib's; WideResNet-50-2 levels 2-3:
        512 + 1024 = 1536 values, ``tf_efficientnet_lite0``: 40 + 112 = 152). A
        pair ``(level_dim, target_dim)``: the authors' released embedding, each
        level's unfolded 3 x 3 neighbourhood averaged down to ``level_dim``
        values, then the levels' values together down to ``target_dim``
        (:func:`reduced_features`; their ``pretrain_embed_dimension`` and
        ``target_embed_dimension``). An int ``d`` is ``(d, d)``; the released
        code's runs use 1024 (its ensembles ``(1024, 384)``). See Notes for the default.
    image_size : int or (int, int), default=224
        Working size images are resized to.
        %(image_size_pair)s
    coreset_ratio : float, default=0.1
        Fraction of the reference patches kept in the memory bank (1.0 keeps all). The
        released code's default, kept by measurement against 0.01 (docs/benchmarks.md,
        "Choosing coreset_ratio").
    projection_dim : int, default=128
        Dimension of the random projection used to select the coreset.
    n_reweight_neighbors : int, default=9
        Bank neighbourhood ``b`` of the image-score reweighting (paper Eq. 7):
        the nearest bank neighbours of the farthest patch's nearest bank patch;
        0 disables the reweighting (score = largest patch distance).
    coreset_chunk_size : int or None, default=32768
        References with at most this many patches get the exact greedy
        coreset (the released code's selection), whose time grows as the
        square of the number of patches; references with more are split at
        random into chunks of at most this many, each thinned on its own (an
        approximation whose time grows linearly; see :func:`greedy_coreset`).
        None: always exact. On the five AITEX fabrics (90 images) and on MT
        (240 images), chunks of 16384 to 65536 patches ranked images as the
        exact selection did, within 0.015 image AUROC (docs/benchmarks.md,
        "The chunked coreset"). Default changed in 0.2 from None: see Notes.
    sigma : float, default=4
        Gaussian smoothing of the maps at ``image_size``.
    %(false_reject_rate)s
    batch_size : int, default=16
        Images per backbone forward pass (fit and scoring).
    %(device)s
    %(verbose)s
    random_state : int, Generator or None, default=None
        Seeds the coreset's projection and starting point (and random backbone
        weights, for tests).
    %(deprecated)s

    Attributes
    ----------
    memory_bank_ : torch.Tensor of shape (n_patches, n_features)
        Coreset of the reference patches.
    backbone_ : skad._backbone.Backbone
        The frozen feature extractor.
    %(n_samples_fit)s
    memory_owner_ : torch.Tensor of shape (n_patches,)
        Index of the reference image each bank patch comes from.
    memory_position_ : torch.Tensor of shape (n_patches,)
        Flat feature-grid position of each bank patch.
    feature_grid_ : tuple of int
        ``(h, w)`` of the patch grid at ``image_size``.
    %(thresholds)s

    Notes
    -----
    The memory bank is the reference: :meth:`set_reference` rebuilds
    ``memory_bank_`` from the new references alone, and the patches of the
    training images (or of earlier references) are gone. A detector set to a
    new surface no longer knows the old one; to score both, pass the images of
    both (``det.set_reference(list(old_good) + list(new_good))``), or keep one
    fitted copy per surface (``sklearn.base.clone`` and ``fit``, or
    ``copy.deepcopy`` before ``set_reference``). ``fit`` itself learns nothing
    else: it is ``set_reference`` on the training images.

    Time and memory of a fit grow linearly with the number of reference
    images (docs/benchmarks.md, "PatchCore fit"). The coreset compares
    patches with patches: its exact selection takes a time that grows as the
    square of their number, so above ``coreset_chunk_size`` patches it is
    made in chunks. The leave-one-out scores that calibrate the thresholds
    compare every patch of a reference with the whole bank, which grows with
    the references: at most ``max_calibration_references`` references are so
    scored. ``None`` for either makes that part grow as the square again.
    A fit holds the reference features once, ``h * w * n_features`` float32
    values per image on the stride-8 patch grid (WideResNet-50-2 levels 2-3
    at 224 px: 28 x 28 x 1536, 4.8 MB; ``tf_efficientnet_lite0`` at 256 px:
    32 x 32 x 152, 0.6 MB; with ``embedding_dim=1024``, 3.2 and 4.2 MB), and
    the memory bank, ``coreset_ratio`` of them, twice while the references
    are scored (the bank and the extended copy that the search multiplies
    with): 1.2 times the features at the default ratio. Besides, a constant:
    the coreset's projection of at most ``coreset_chunk_size`` patches with a
    copy of their features (``coreset_chunk_size * (n_features + 162)``
    values, 41 MB for lite0 and 222 MB for WideResNet-50-2) and blocks of at
    most 128 MiB for the searches. On a CPU that other jobs share, give torch
    no more threads than there are free cores (``torch.set_num_threads``): the
    coreset's many small operations each wait for every thread, and took ten
    times longer with two threads than with one beside another job
    (docs/benchmarks.md, "PatchCore fit").

    Defaults changed in 0.2 for the time of large fits (issue 12):
    ``coreset_chunk_size=32768`` (was None: the exact selection at any size;
    the selection is unchanged up to 32768 patches) and the new
    ``max_calibration_references=200`` (all references calibrated before).

    With the default ``embedding_dim=None``, the patch features, memory bank
    and scores are those of anomalib's ``PatchcoreModel`` with the same
    backbone and layers: with the full bank the image scores are equal to float
    precision, with the coreset they rank alike (tests/test_parity.py;
    docs/benchmarks.md, "PatchCore against anomalib"). Like anomalib, and
    unlike the authors' released code (amazon-science/patchcore-inspection),
    skad by default

    - joins the levels' full channels, each averaged over the 3 x 3
      neighbourhood, instead of averaging each patch's unfolded neighbourhood
      down to 1024 values per level and 1024 in all (``embedding_dim=1024``);
    - scores an image with the paper's Eq. 7 re-weighting (``n_reweight_neighbors=9``);
      the released code takes the largest patch distance (``n_reweight_neighbors=0``);
    - selects the coreset from one random starting patch on a Gaussian random
      projection (the released code: 10 starting patches, a linear
      projection layer);
    - resizes the whole image to ``image_size``; the released code resizes to
      256 and keeps the central 224 px, so that 6 % of each border is never
      scored and a defect there never found.

    Measured with ``tf_efficientnet_lite0`` at 256 px on the AITEX fabrics
    and ``mt`` (docs/benchmarks.md, "PatchCore's remaining differences from
    the released code"): the maximum ranks images like Eq. 7 (within 0.001
    image AUROC, three fabrics one-class); the centre crop lost 0.02-0.06
    image AUROC (two).
    The released embedding ranked images better one-class on four of five
    fabrics (mean image AUROC 0.818 against 0.806; aitex_02 0.022 worse) and
    with 10 references on four of six surfaces (0.766 against 0.744; aitex_02
    and mt 0.018 worse), and localised better (PRO 0.607 against 0.534
    one-class, 0.588 against 0.504 with 10 references, better on every
    surface). With WideResNet-50-2 (1536 values down to 1024) it cost no time
    (fit 44.5 s against 42.9 s, scoring 1.10 against 1.05 images/s, 40 images
    at 224 px); with lite0 it inflates 152 values per patch to 1024: 6.7
    times the memory bank, and one-class twice the fit time at 40 images and
    4.1 times at 90, 1.9 to 3.7 times the scoring time on the CPU (with 10
    references, little: the backbone dominates). ``embedding_dim=None`` stays
    the default for anomalib's parity, on which the tests and the benchmark
    record rest, and for the small backbones' one-class fit time; ``mt``,
    the largest surface, is not yet measured one-class with the released
    embedding. On accuracy alone the measurements favour the released
    embedding: pass ``embedding_dim=1024`` where localisation matters more
    than fit time, and with WideResNet-50-2.

    Examples
    --------
    >>> from skad import PatchCore, datasets
    >>> data = datasets.make_textures(n_domains=1, n_normal=12, n_anomalous=6,
    ...                               image_size=64, random_state=0)
    >>> normal = data.images[data.y == 0]
    >>> # 8 normal images calibrate false-reject rates of 1/9 and above
    >>> det = PatchCore(backbone="test_resnet", weights=None, image_size=64,
    ...                 false_reject_rate=0.2, random_state=0).fit(normal[:8])
    >>> det.decision_function(data.images[8:]).shape
    (10,)
    >>> det.predict_map(data.images[:2]).shape
    (2, 64, 64)
    """

    _compares_with_references = True

    #: read by scoring: changed after set_reference, the calibration no longer holds
    _scoring_parameters: ClassVar[tuple] = (*BaseDetector._scoring_parameters, "sigma",
                                            "n_reweight_neighbors")

    _parameter_constraints: ClassVar[dict] = {
        **BaseDetector._parameter_constraints,
        **backbone_constraints(),
        "embedding_dim": [Ints(1), Sequences(Ints(1), length=2), None],
        "coreset_ratio": [Reals(0, 1, closed="right")],
        "projection_dim": [Ints(0)],
        "n_reweight_neighbors": [Ints(0)],
        "coreset_chunk_size": [Ints(1), None],
        "sigma": [Reals(0)],
        "n_projections": deprecated(Ints(0)),
        "n_reweight": deprecated(Ints(0)),
    }
    # n_projections was a dimension, not a count; n_reweight the neighbours of Eq. 7
    _deprecated_parameters: ClassVar[dict] = {"n_projections": "projection_dim",
                                              "n_reweight": "n_reweight_neighbors"}

    def __init__(self, *, backbone="wide_resnet50_2.tv_in1k", weights="pretrained",
                 layers=(2, 3), embedding_dim=None, image_size=224, coreset_ratio=0.1,
                 projection_dim=128, n_reweight_neighbors=9, coreset_chunk_size=32768,
                 sigma=4.0, false_reject_rate=0.05, max_calibration_references=200,
                 threshold_quantile=DEPRECATED, batch_size=16,
                 device="auto", verbose=0, random_state=None, n_projections=DEPRECATED,
                 n_reweight=DEPRECATED):
        # scikit-learn's constructor: the parameters stored as given, nothing else
        self._store_parameters(locals())

    def _fit(self, images, y, groups):
        self.backbone_ = self._create_backbone(load_weights=True)

    def _create_backbone(self, load_weights):
        return create_backbone(self.backbone, self.weights, self.layers,
                               random_state=self.random_state, load_weights=load_weights)

    def _empty_networks(self, shapes):
        """The backbone's architecture, for :func:`skad.load` to fill."""
        return {"backbone_": self._create_backbone(load_weights=False)}

    def _embed(self, batch):
        """Locally aware patch features of a batch: :func:`locally_aware_features`, or
        :func:`reduced_features` with an ``embedding_dim``."""
        with self._autocast(batch.device):
            levels = self.backbone_(batch)
        if self.embedding_dim is None:
            return locally_aware_features(levels)
        dims = self.embedding_dim
        level_dim, target_dim = dims if isinstance(dims, (tuple, list)) else (dims, dims)
        return reduced_features(levels, int(level_dim), int(target_dim))

    def _set_reference(self, images, calibration):
        # channels last: the patches are a view of the maps, so the features are held once
        feats = self._map_images(images, lambda batch: self._embed(batch).permute(0, 2, 3, 1),
                                 desc="reference features", split=True)
        n, h, w, dim = feats.shape
        patches = feats.view(-1, dim)
        device = self._device()
        gen = torch.Generator().manual_seed(seed_from(self.random_state))
        n_keep = max(1, int(np.ceil(self.coreset_ratio * len(patches))))
        keep = greedy_coreset(patches.to(device), n_keep, self._param("projection_dim"), gen,
                              self.coreset_chunk_size, verbose=self.verbose)
        self.memory_bank_ = patches[keep].contiguous()
        self.memory_owner_ = keep // (h * w)  # the image and grid position of each bank patch
        self.memory_position_ = keep % (h * w)
        self.feature_grid_ = (h, w)
        if n == 1:
            return self._single_reference_scores(feats[0])
        return self._leave_one_out_scores(feats, calibration)

    def _leave_one_out_scores(self, feats, calibration):
        """The references at ``calibration`` scored against the bank without their own
        patches (Eq. 7 included), and the maxima of their maps so scored (which calibrate
        ``pixel_threshold_``).

        Every patch of those references is searched (:func:`nearest_outside`: the
        distances of :func:`nearest`, the minimum taken on their squares): the
        farthest patch of a normal image is hardly farther than the others, so the
        bank prefixes of :func:`farthest_patch` bound too loosely to leave patches
        out (docs/benchmarks.md, "PatchCore fit").
        """
        device = self._device()
        bank = self.memory_bank_.to(device)
        h, w = self.feature_grid_
        own = _rows_by_image(self.memory_owner_, len(feats))
        bank_aug = augmented_bank(bank)
        workspace = {}  # the search's buffers, allocated once for every reference
        dist = torch.empty(len(calibration), h * w)
        farthest, s_star, m_star = [], [], []
        bar = progress(calibration.tolist(), desc="leave-one-out scores",
                       verbose=self.verbose, unit="image")
        for k, i in enumerate(bar):
            q = feats[i].to(device).flatten(0, 1)
            d, index = nearest_outside(q, bank_aug, own[i].to(device), workspace)
            if not torch.isfinite(d).any():
                raise ValueError(self._no_leave_one_out(i, len(feats)))
            j = int(torch.argmax(d))  # every patch has the same allowed bank rows: all finite
            dist[k] = d.cpu()
            farthest.append(q[j])
            s_star.append(d[j])
            m_star.append(index[j])
        scores = _reweighted_scores_outside(torch.stack(farthest), torch.stack(s_star),
                                            torch.stack(m_star), bank,
                                            [own[i].to(device) for i in calibration.tolist()],
                                            self._param("n_reweight_neighbors"))
        maxima = torch.cat([grid_to_map(g.view(-1, h, w), self.image_size, self.sigma)
                            .flatten(1).amax(dim=1) for g in dist.split(_MAP_BATCH)])
        return scores.cpu().numpy(), maxima.numpy()

    def _single_reference_scores(self, f):
        """The score and map maximum of a single reference ``f (h, w, dim)``: there is no
        other image, so a patch is scored without the bank patches of its own 3 x 3
        neighbourhood (which share its averaged features), and patches with none left
        outside it do not count."""
        device = self._device()
        bank = self.memory_bank_.to(device)
        pos = self.memory_position_.to(device)
        h, w = self.feature_grid_
        q = f.to(device).flatten(0, 1)
        qpos = torch.arange(h * w, device=device)

        def excluded(rows):
            return adjacent(qpos[rows], pos, w)

        # every patch, as _score_batch scores a new image's map
        dist, index = nearest(q, bank, excluded)
        counts = torch.isfinite(dist)
        if not counts.any():
            raise ValueError(self._no_leave_one_out(0, 1))
        j = int(torch.argmax(torch.where(counts, dist, -torch.inf)))
        score = self._image_score(q, j, dist[j], index[j], bank, excluded=excluded)
        # patches that do not count take the largest distance: the map's maximum, and
        # with it pixel_threshold_, errs high rather than low
        grid = torch.where(counts, dist, dist[j]).view(1, h, w)
        amax = grid_to_map(grid, self.image_size, self.sigma).amax()
        return score[None].cpu().numpy(), amax[None].cpu().numpy()

    def _no_leave_one_out(self, i, n_references):
        """Why reference ``i`` cannot be scored without its own patches, and what to change."""
        h, w = self.feature_grid_
        if n_references == 1:
            return (
                f"PatchCore cannot calibrate threshold_ on one reference image with a {h} x {w} "
                f"patch grid and {len(self.memory_bank_)} bank patches: every bank patch lies in "
                "the 3 x 3 neighbourhood of every patch, so the image would be scored against "
                "itself. Pass at least 2 reference images (or raise image_size or coreset_ratio)"
            )
        return (
            f"PatchCore cannot calibrate threshold_: the memory bank's {len(self.memory_bank_)} "
            f"patches all come from reference image {i}, which then has no other image's patch "
            f"to be scored against. Raise coreset_ratio (now {self.coreset_ratio}) so that the "
            f"bank keeps patches of at least 2 of the {n_references} reference images"
        )

    def _image_score(self, q, j, s_star, m_star, bank, excluded=None):
        """:func:`reweighted_score` with ``n_reweight_neighbors``."""
        return reweighted_score(q, j, s_star, m_star, bank, self._param("n_reweight_neighbors"),
                                excluded)

    def _score_batch(self, batch, return_maps):
        feats = self._embed(batch)
        bank = self.memory_bank_.to(batch.device)
        q = feats.flatten(2).transpose(1, 2)  # (B, N, dim): each image's patches
        if not return_maps:  # the score needs the farthest patch only
            return torch.stack([self._image_score(qi, *farthest_patch(qi, bank), bank)
                                for qi in q]), None
        # every patch of the batch in one search, and Eq. 7 without a loop over the
        # images: the ONNX graph (skad._onnx) runs this for any batch size
        dist, idx = (t.unflatten(0, q.shape[:2])
                     for t in nearest_in_bank(q.flatten(0, 1), bank))
        scores = reweighted_scores(q, dist, idx, bank, self._param("n_reweight_neighbors"))
        grids = dist.unflatten(1, feats.shape[2:])
        return scores, grid_to_map(grids, self.image_size, self.sigma)

    def _to_device(self, device):
        self.backbone_.to(device)

    def __setstate__(self, state):
        # pickles and model files saved before embedding_dim existed: their memory bank
        # holds the full channels, and they keep scoring with them
        state.setdefault("embedding_dim", None)
        super().__setstate__(state)
