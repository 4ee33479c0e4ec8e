"""Evaluation harness: benchmark protocols run end to end on a model and a dataset.

Each ``run_*`` function opens a dataset in one of the supported layouts, runs the model as
the protocol says, scores it with :mod:`rsvl.metrics`, and returns an
:class:`EvalResult` holding every number and the full settings (model, weights and their
sha256, templates, class names, split, protocol parameters, rsvl version, dataset path,
number of samples, seconds). Nothing is random: samples are taken in the reader's order
and ``limit`` keeps an evenly spaced, deterministic subset.

Protocols (see ``../shared/reference/farslip-fsvlm-fianet.md`` 1.4, 1.5 and 3.4):

- zero-shot classification: resize the short side, centre crop (:func:`rsvl.eval.results.load_square`), class-name
  embeddings averaged over templates; top-1, top-5, per-class accuracy and its mean.
- retrieval: images deduplicated by path, texts by string; R@1/5/10 both directions and
  mean recall (:func:`rsvl.metrics.retrieval_recall`).
- OVSS: mmseg ``Resize(scale, keep_ratio=True)``, sliding windows (crop, stride, windows
  clamped to the image edge), per-query cosine logits averaged over windows, bilinear
  upsampling to the label size, ``x logit_scale``, softmax over the queries, max over the
  synonyms of each class, optional ``prob_thd`` -> ``bg_idx``; mmseg ``IoUMetric`` with
  background counted and 255 ignored (``reduce_zero_label`` where the preset says so).
- referring: LAVT / FIANet per-sample IoU, mIoU, oIoU, Pr@X on predicted mask files.
- COCO: pycocotools AP on a detections JSON.
- farmland: FSVLM's test.py on a FIT-layout folder (:mod:`rsvl.eval.farmland`).
- chat: RSEvalKit's VHM_Eval task files, scored as upstream does and corrected where its
  scorers are wrong (:mod:`rsvl.eval.chat`, :mod:`rsvl.eval.chat_scorers`).
"""

from rsvl.eval.chat import (
    TASKS,
    ChatTask,
    evaluate_chat,
    read_chat_file,
    resolve_task,
    resolve_tasks,
)
from rsvl.eval.coco import run_coco, run_coco_model
from rsvl.eval.farmland import ClassProbabilityBaseline, run_farmland
from rsvl.eval.ovss import (
    OVSS_PROTOCOLS,
    OvssProtocol,
    open_segmentation_dataset,
    ovss_predict,
    ovss_protocol,
    rescale_size,
    run_ovss,
    sliding_windows,
)
from rsvl.eval.refer import open_refer_dataset, run_refer, run_refer_model
from rsvl.eval.results import (
    PROMPT_NAMES,
    EvalResult,
    model_settings,
    prompt_name,
    subset_indices,
    write_result,
)
from rsvl.eval.retrieval import open_caption_dataset, run_retrieval
from rsvl.eval.zeroshot import open_scene_dataset, run_zeroshot

__all__ = [
    "OVSS_PROTOCOLS",
    "TASKS",
    "ChatTask",
    "ClassProbabilityBaseline",
    "PROMPT_NAMES",
    "EvalResult",
    "OvssProtocol",
    "evaluate_chat",
    "model_settings",
    "open_caption_dataset",
    "open_refer_dataset",
    "open_scene_dataset",
    "open_segmentation_dataset",
    "ovss_predict",
    "ovss_protocol",
    "prompt_name",
    "read_chat_file",
    "rescale_size",
    "resolve_task",
    "resolve_tasks",
    "run_coco",
    "run_coco_model",
    "run_farmland",
    "run_ovss",
    "run_refer",
    "run_refer_model",
    "run_retrieval",
    "run_zeroshot",
    "sliding_windows",
    "subset_indices",
    "write_result",
]
