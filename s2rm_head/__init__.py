"""s2rm_head: S²RM spatial-semantic fusion, CASG decoder and baseline fusion heads.

The head modules are built in the s2rm_head issue; this package exists so the distribution
ships both top-level packages from the start.
"""

__all__: list[str] = []
