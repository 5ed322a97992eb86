"""Shape buckets shared by every decoding loop: the Engine, the device loop and plain decoding.

Compiled programs are keyed by shapes, so widths and lengths round up to a few buckets; plain
decoding pads prompts by the same rule as the Engine, so both prefill the same shapes.
"""

from __future__ import annotations

MIN_PROMPT_BUCKET = 16
PROMPT_GRANULE = 64  # prompt widths above this round up to multiples of it (less padding than powers of two)
MIN_CACHE_BUCKET = 128


def next_power_of_two(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(int(n) - 1, 0).bit_length())


def prompt_bucket(longest: int, chunk: int) -> int:
    """Padded prompt width for a batch whose longest prompt has ``longest`` tokens.

    A power of two up to ``PROMPT_GRANULE``, then granule multiples up to the prefill ``chunk``, then
    chunk multiples (at most chunk / granule + 3 compiled widths; prefill compute is proportional to the
    width, so a 140-token prompt pads to 192, not 256). For a power-of-two chunk it never exceeds
    ``next_power_of_two(longest, MIN_PROMPT_BUCKET)``: a cache bucket covering the real tokens covers the padding.
    """
    if longest > chunk:
        return -(-longest // chunk) * chunk
    if longest <= PROMPT_GRANULE or chunk <= PROMPT_GRANULE:
        return min(next_power_of_two(longest, MIN_PROMPT_BUCKET), chunk)
    return -(-longest // PROMPT_GRANULE) * PROMPT_GRANULE
