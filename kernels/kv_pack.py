"""Copy the K/V of chosen token slots of one layer to and from a contiguous buffer.

The cache of one layer is ``kv[2, num_pages, page_size, num_kv_heads, head_dim]``; slot
``page * page_size + offset`` names one token. The transfer buffer is
``buf[2, n, num_kv_heads, head_dim]``: K then V of the ``n`` slots, in order.

The numba kernels copy maximal runs of consecutive slots (whole pages, usually) as single
block copies. They move raw elements, so they serve every dtype, bf16 included, through
an integer view of the same width.
"""

import numba
import torch

_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def pack_slots_reference(kv, slots):
    """K/V of ``slots`` as a contiguous ``[2, n, KVH, D]`` tensor (``index_select``)."""
    return _token_view(kv).index_select(1, slots)


def unpack_slots_reference(kv, slots, buf):
    """Write ``buf[2, n, KVH, D]`` into ``slots`` of ``kv`` in place (``index_copy_``)."""
    _token_view(kv).index_copy_(1, slots, buf)


@numba.njit(cache=True, fastmath=False)
def _run_end(slots, start):
    """End of the run of consecutive slot numbers that begins at ``slots[start]``."""
    end = start + 1
    while end < slots.shape[0] and slots[end] == slots[end - 1] + 1:
        end += 1
    return end


@numba.njit(cache=True, fastmath=False)
def _run_rows(slots, start, end, width, size):
    """Element range, in a flat ``[S * width]`` half of the cache, of the slot run
    ``slots[start:end]``; raises if it falls outside the cache."""
    first = slots[start] * width
    last = first + (end - start) * width
    if first < 0 or last > size:
        raise IndexError("slot out of range")
    return slice(first, last)


@numba.njit(cache=True, fastmath=False)
def _copy(dst, src):
    """``dst[:] = src`` as an explicit loop, which compiles to a vectorized copy (numba's
    slice assignment does not)."""
    for i in range(src.shape[0]):
        dst[i] = src[i]


@numba.njit(cache=True, fastmath=False)
def _pack_kernel(cache, slots, buf, width):
    """``buf[h, i] = cache[h, slots[i]]`` for rows of ``width`` elements, run by run.

    ``cache`` is ``[2, S * width]`` and ``buf`` is ``[2, n * width]``.
    """
    start = 0
    while start < slots.shape[0]:
        end = _run_end(slots, start)
        rows = _run_rows(slots, start, end, width, cache.shape[1])
        for half in range(2):
            _copy(buf[half, start * width:end * width], cache[half, rows])
        start = end


@numba.njit(cache=True, fastmath=False)
def _unpack_kernel(cache, slots, buf, width):
    """``cache[h, slots[i]] = buf[h, i]`` for rows of ``width`` elements, run by run."""
    start = 0
    while start < slots.shape[0]:
        end = _run_end(slots, start)
        rows = _run_rows(slots, start, end, width, cache.shape[1])
        for half in range(2):
            _copy(cache[half, rows], buf[half, start * width:end * width])
        start = end


def pack_slots_numba(kv, slots):
    """Numba version of :func:`pack_slots_reference` for CPU tensors of any dtype."""
    if kv.device.type != "cpu":
        return pack_slots_reference(kv, slots)
    buf = kv.new_empty((2, slots.shape[0], kv.shape[3], kv.shape[4]))
    _pack_kernel(_flat(kv), _slot_array(slots), _flat(buf), _row_width(kv))
    return buf


def unpack_slots_numba(kv, slots, buf):
    """Numba version of :func:`unpack_slots_reference` for CPU tensors of any dtype."""
    if kv.device.type != "cpu":
        unpack_slots_reference(kv, slots, buf)
        return
    expected = (2, slots.shape[0], kv.shape[3], kv.shape[4])
    if buf.dtype != kv.dtype or tuple(buf.shape) != expected:
        raise ValueError(f"buffer is {buf.dtype}{list(buf.shape)}, "
                         f"expected {kv.dtype}{list(expected)}")
    _unpack_kernel(_flat(kv), _slot_array(slots), _flat(buf.contiguous()), _row_width(kv))


def pack_slots(kv, slots):
    """K/V of ``slots`` (int64) of one layer as a contiguous ``[2, n, KVH, D]`` buffer.

    Always ``index_select``: on CPU the numba copier measured slower up to 256 tokens
    (0.6-0.94x) and about even from 1024 (0.95-1.33x, ``results/kernels.md``), both being
    bound by filling the fresh buffer; CUDA is torch anyway.
    """
    return pack_slots_reference(kv, slots)


def unpack_slots(kv, slots, buf):
    """Write ``buf[2, n, KVH, D]`` into ``slots`` (int64) of one layer, in place.

    CPU uses the numba run copier, which measured 1.7x to 7x faster than ``index_copy_``
    at every size, dtype and slot layout (``results/kernels.md``); CUDA uses torch.
    """
    unpack_slots_numba(kv, slots, buf)


def _token_view(kv):
    """``kv`` as ``[2, num_pages * page_size, KVH, D]`` (a view, no copy)."""
    return kv.view(2, -1, kv.shape[-2], kv.shape[-1])


def _flat(tensor):
    """A contiguous ``[2, ...]`` tensor as a ``[2, numel / 2]`` integer numpy array of the
    same element width, sharing its memory."""
    if not tensor.is_contiguous():
        raise ValueError("KV tensors must be contiguous")
    return tensor.view(_INT_OF_WIDTH[tensor.element_size()]).numpy().reshape(2, -1)


def _row_width(kv):
    return kv.shape[-2] * kv.shape[-1]


def _slot_array(slots):
    return slots.detach().cpu().numpy()
