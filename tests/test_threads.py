"""skad._threads: a batch's images split over Python threads, one PyTorch thread each."""

import threading

import pytest
import torch

from skad._threads import _openmp, split_batch, thread_map


@pytest.fixture
def three_threads():
    """PyTorch on three threads for the test, the session's count again after."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(before)


def _record(calls):
    """An ``fn`` that notes each call's rows, thread and PyTorch thread count and returns
    the rows doubled, their first column and None."""
    def fn(part):
        calls.append((part[:, 0].tolist(), threading.get_ident(), torch.get_num_threads(),
                      torch.is_inference_mode_enabled()))
        return part * 2, [part[:, 0], None]
    return fn


def test_parts_are_computed_on_worker_threads_and_joined_in_order(three_threads):
    batch = torch.arange(14.0).view(7, 2)
    calls = []
    with torch.inference_mode():
        doubled, (first, none) = split_batch(_record(calls), batch)
    assert torch.equal(doubled, batch * 2) and torch.equal(first, batch[:, 0]) and none is None
    assert sorted(rows for rows, *_ in calls) == [[0.0, 2.0, 4.0], [6.0, 8.0], [10.0, 12.0]]
    assert threading.get_ident() not in {ident for _, ident, _, _ in calls}
    assert {(n, inference) for _, _, n, inference in calls} == {(1, True)}


def test_the_callers_thread_count_is_kept_also_for_threads_started_after(three_threads):
    with torch.inference_mode():
        split_batch(lambda part: part, torch.zeros(6, 1))
    assert torch.get_num_threads() == three_threads
    seen = []
    later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    later.start()
    later.join()
    assert seen == [three_threads]


@pytest.mark.parametrize("case", ["gradients", "one thread", "one image", "not on the CPU",
                                  "not OpenMP"])
def test_not_split_where_it_would_not_help_or_be_safe(three_threads, case, monkeypatch):
    batch = torch.arange(8.0).view(4, 2)
    if case == "one image":
        batch = batch[:1]
    elif case == "not on the CPU":
        batch = batch.to("meta")
    elif case == "one thread":
        torch.set_num_threads(1)
    elif case == "not OpenMP":  # PyTorch's own pool: one thread count for every thread
        monkeypatch.setattr(torch.__config__, "parallel_info",
                            lambda: "ATen parallel backend: native thread pool")
        _openmp.cache_clear()
    calls = []

    def fn(part):
        calls.append((len(part), threading.get_ident()))
        return part

    with torch.set_grad_enabled(case == "gradients"):
        split_batch(fn, batch)
    _openmp.cache_clear()
    assert calls == [(len(batch), threading.get_ident())]


def test_a_workers_exception_reaches_the_caller_and_the_thread_count_is_restored(three_threads):
    def fn(part):
        if part[0] > 2:
            raise ValueError(f"image {int(part[0])} is bad")
        return part

    with torch.inference_mode(), pytest.raises(ValueError, match="image 4 is bad"):
        split_batch(fn, torch.arange(6.0))
    assert torch.get_num_threads() == three_threads


@pytest.mark.parametrize("n_images,parts", [(2, [2]), (3, [3]), (4, [2, 2]), (5, [3, 2]),
                                            (6, [2, 2, 2]), (16, [6, 5, 5])])
def test_parts_hold_two_images_at_least_on_one_torch_thread(three_threads, n_images, parts):
    calls = []

    def fn(part):
        calls.append((len(part), threading.get_ident(), torch.get_num_threads()))
        return part

    with torch.inference_mode():
        split_batch(fn, torch.zeros(n_images))
    assert sorted((n for n, _, _ in calls), reverse=True) == parts
    assert {n for _, _, n in calls} == {1}
    assert threading.get_ident() not in {ident for _, ident, _ in calls}


def test_thread_map_keeps_the_order_of_its_items(three_threads):
    assert thread_map(lambda i: i * i, list(range(5))) == [0, 1, 4, 9, 16]
