# Type stub of the compiled extension (cpp/ops.cpp). Importing it registers the operators
# torch.ops.lowp.*; the names below are the vocabulary shared with Python (cpp/vocabulary.h).

built_with_cuda: bool
ROUNDING_MODES: tuple[str, ...]
FORMAT_KINDS: tuple[str, ...]
SPECIALS: tuple[str, ...]
OVERFLOWS: tuple[str, ...]
SCALE_ROUNDINGS: tuple[str, ...]
SCALES: tuple[str, ...]
FORMAT_PARAMS: dict[str, tuple[str, ...]]
