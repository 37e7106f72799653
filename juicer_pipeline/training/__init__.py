"""The student trainer, apart from the method (as open_clip_train is apart from open_clip).

- `config.py`: what a run is (architecture, budget, schedule, precision, phases)
- `loss.py`: the one contrastive loss, for students and the governor
- `schedule.py`: the one warm-up + cosine schedule
- `runtime.py`: precision, attention kernels and threads
- `trainer.py`: `train_student`, the loop
- `evaluation.py`: held-out retrieval and zero-shot scores
- `dense_features.py`, `dense_evaluation.py`: what the frozen patch tokens know (segmentation
  probes, MaskCLIP zero-shot segmentation and pointing, counting, attribute binding)
- `distributed.py`: data-parallel training under torchrun

No Dagster here: the assets call `train_student` / `train_student_processes` and `evaluate_student`.
"""
from .config import StudentConfig, student_config, with_native_precision
from .dense_evaluation import DENSE_METRICS, evaluate_dense
from .evaluation import EvalSet, evaluate_student, held_out_eval_set, load_eval_set, zero_shot_classifier
from .loss import clip_loss
from .trainer import TrainData, train_student

__all__ = ["DENSE_METRICS", "EvalSet", "StudentConfig", "TrainData", "clip_loss", "evaluate_dense", "evaluate_student", "held_out_eval_set",
           "load_eval_set", "student_config", "train_student", "with_native_precision", "zero_shot_classifier"]
