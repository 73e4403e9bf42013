"""The helper's operations: the request models and the op functions, one module per family."""
