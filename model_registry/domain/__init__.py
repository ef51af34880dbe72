"""The rules and words of the product, with no I/O: promotion requests, policy, diffs, names, errors."""
