"""The vocabulary every layer shares: who is asking (identity) and what policy decided.

Plain, validated, frozen data with no behaviour beyond small helpers. Features pass these
to one another only through the typed fields of the proxy's hook data, so none of them
imports another to understand what it was handed.
"""
