"""fedlora: federated fine-tuning with nested low-rank adapters and exact aggregation.

The package namespace is the nested-adapter API (:mod:`fedlora.nested`, re-exported as it is), the outer
factors (:mod:`fedlora.outer`) and the export (:mod:`fedlora.export`); see ``docs/api.md``.
This package never imports flwr; Flower lives in ``strategies/``, ``clients/`` and ``simulations/``.
"""

from fedlora.export import export_merged, export_peft_adapter, restore_base, to_peft_model
from fedlora.nested import *  # noqa: F403  (the nested-adapter API: fedlora.nested.__all__)
from fedlora.nested import __all__ as _nested_api
from fedlora.outer import OuterFactorCache, truncated_svd

__version__ = "0.1.0"

__all__ = ["OuterFactorCache", "export_merged", "export_peft_adapter", "restore_base", "to_peft_model", "truncated_svd"]
__all__ += _nested_api
