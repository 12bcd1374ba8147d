"""Default bounds on what one row's inputs may cost (the config's `input` section documents them)."""

# 64 MiB holds any usual JPEG and a lossless photo of about 4096x4096 (48 MiB raw RGB); it bounds
# the memory one row's read can take, before the pixel count is known.
DEFAULT_MAX_INPUT_BYTES = 64 << 20
DEFAULT_READ_TIMEOUT_S = 60.0
DEFAULT_MAX_PIXELS = 8192 * 8192  # decompression-bomb limit
