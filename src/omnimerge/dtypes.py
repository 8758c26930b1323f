"""The dtypes a recipe may name for computing and writing (recipe `dtype`, `out_dtype`)."""

DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")
