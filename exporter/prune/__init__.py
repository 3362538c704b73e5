"""The prune stage: shrink the torch model before export, so the ONNX shapes really get smaller.

- `vocab.py` (Korean vocabulary pruning), `structured.py` (FFN channels, heads, layers),
  `sparsity.py` (magnitude sparsity), `sensitivity.py` (one layer at a time, table and plot).
- `pipeline.py` is the pass: `prune_checkpoint(resolved, out, PruneOptions)` writes a pruned
  checkpoint; `prune_model` also exports it.
- `heal.py` is the heal pass: `heal_checkpoint(teacher, student, out, HealConfig, work)` distils the
  unpruned model into the pruned checkpoint (LoRA merged, or full fine-tuning).
- `vocab_eval.py` scores vocabulary variants from one pass of the unpruned model.
May import `runtime` and `exporter.export`; never `exporter.cli`.
"""

from exporter.prune.heal import HealConfig, heal_checkpoint
from exporter.prune.pipeline import (RECIPE_KEYS, PruneOptions, options_from_dict, prune_checkpoint, prune_model,
                                     refuse_bundle, run_sensitivity)
from exporter.prune.sparsity import SparsityConfig
from exporter.prune.structured import StructuredConfig
from exporter.prune.vocab import VocabConfig

__all__ = ["RECIPE_KEYS", "HealConfig", "PruneOptions", "SparsityConfig", "StructuredConfig", "VocabConfig",
           "heal_checkpoint", "options_from_dict", "prune_checkpoint", "prune_model", "refuse_bundle", "run_sensitivity"]
