"""The one place where the files passed between pipeline stages are described.

Every stage reads and writes through these names, so a column renamed here is
renamed everywhere. Paths are relative to the working directory of the
workflow (the repository root).

Stage files
-----------
``results/data/{split}.npz``  (split in SPLITS)
    images   uint8   [N, H, W, 3]  RGB, 0..255
    labels   int64   [N]           class index
    maps     float32 [N, H, W]     human feature-importance map, max-normalised to [0, 1]
                                    (all zeros where has_map is False)
    has_map  bool    [N]
    ids      str     [N]           unique image id, e.g. ``stim_00003``
``results/data/classes.csv``           CLASS_COLUMNS
``results/data/stimuli_manifest.csv``  MANIFEST_COLUMNS (one row per stimulus)
``results/data/imagenet_{split}.csv``  IMAGENET_INDEX_COLUMNS (paper mode, split train|val:
                                        one row per ImageNet image; training reads it)
``{weights_cache}/{model}.pth``        paper mode: a timm pretrained state dict (advalign.weights)

``results/models/{model}/weights.pt``   torch.save({"state_dict", "meta"}) of a trained model
``results/models/{model}/metrics.json`` TRAIN_METRICS_KEYS
``results/models/{model}/history.csv``  HISTORY_COLUMNS (one row per epoch)

``results/attacks/{attack}/{model}.parquet``  ATTACK_COLUMNS, one row per stimulus
``results/attacks/{attack}/{model}.npz``      EXAMPLE_ARRAYS: perturbations kept for figures

``results/data/conflict.npz``           synthetic only: CONFLICT_ARRAYS, the cue-conflict set
``results/stats/cue_reliance.csv``      synthetic only: RELIANCE_COLUMNS, one row per model
``results/human_alignment/{model}.csv``  HUMAN_ALIGNMENT_COLUMNS, one row per stimulus with a map
``results/attention/{model}.csv``        ATTENTION_COLUMNS, one row per stimulus with a kept example
``results/stats/model_attack_table.csv``  MODEL_ATTACK_COLUMNS, one row per model x attack
``results/stats/tests.json``              list of TEST_KEYS dicts (every docs/methods.md §5 test)
``results/tables/claims.{csv,md}``        CLAIM_COLUMNS
``results/tables/table_s1.{csv,md}``      TABLE_S1_COLUMNS
``results/tables/table_s2.{csv,md}``      TABLE_S2_COLUMNS
``figures/{fig}.{png,pdf}``               fig in figure_registry.figure_names()

The attacks and the figures are not listed here: their names are those of the attack
registry (``advalign.attacks.attack_names()``) and of the figure registry
(``advalign.figure_registry.figure_names()``). This module imports nothing, so a stage's
code fingerprint (advalign.provenance) does not grow by importing it.
"""

SPLITS = ("train", "heldout", "stimuli")
# The attack whose per-model tolerance and alignment are the paper's measures: Figs. 2-5, S1-S2,
# Table S2, and the claims' tests (Fig. S3 and the CW comparison name their second attack).
MAIN_ATTACK = "pgd_l2"

ARCH_CLASSES = ("CNN", "ViT", "hybrid")
TRAINING_KINDS = ("standard", "harmonized", "control", "robust")

SPLIT_ARRAYS = ("images", "labels", "maps", "has_map", "ids")
# The synthetic benchmark's cue-conflict test set, results/data/conflict.npz: the part
# glyph shows ``part`` (= labels) and the background context another class, ``context``.
CONFLICT_SPLIT = "conflict"
CONFLICT_ARRAYS = (*SPLIT_ARRAYS, "part", "context")
# results/stats/cue_reliance.csv (synthetic data only; advalign.reliance): one row per model.
RELIANCE_COLUMNS = (
    "model",
    "part_reliance",  # conflict decisions following the part / those following part or context
    "n_conflict",
    "n_conflict_part",
    "n_conflict_context",
    "n_conflict_other",  # decisions for neither cue's class
    "accuracy_stimuli",  # fractions in [0, 1] on the stimuli with a map
    "accuracy_part_occluded",  # the human-marked region (map >= 0.5) replaced by matched noise
    "accuracy_context_occluded",  # everything outside it replaced
    "n_stimuli",
)
CLASS_COLUMNS = ("class_index", "class_name", "animate")
MANIFEST_COLUMNS = (
    "image_id",
    "class_index",
    "wordnet_id",  # ImageNet WordNet id (paper mode); empty for synthetic data
    "class_name",
    "animate",
    "source",  # where the image comes from, e.g. ClickMe shard and record: "val-3.tfrecords#125"
)
IMAGENET_INDEX_COLUMNS = ("path", "class_index", "wordnet_id")

# The zoo: one row per model the attack stage sees (base models from the zoo
# table, derived models -- harmonized, control, robust -- from config).
ZOO_COLUMNS = (
    "model",  # unique, file-name safe id used as the {model} wildcard
    "timm_name",  # timm architecture (paper mode: with pretrained tag)
    "timm_kwargs",  # JSON dict passed to timm.create_model (demo: small configs)
    "arch_class",  # CNN | ViT | hybrid
    "family",  # Table S1 family, e.g. ResNet, ConvNeXt, DeiT
    "training",  # standard | harmonized | control | robust
    "base_model",  # the model a derived model starts from ('' for standard)
    "harmonizer_lambda",  # harmonized only
    "robust_eps",  # robust only (l_inf, pixel scale [0, 1])
    "epochs",  # standard models the pipeline trains: their training budget ('' = training.epochs)
    "top1",  # published ImageNet top-1 (paper mode); NaN where the pipeline measures it
    "top1_source",
    # Bring your own checkpoint (paper mode; advalign.weights.import_checkpoint):
    "checkpoint",  # '' = timm's pretrained weights; else a path or package:NAME/path to a torch file
    "checkpoint_keys",  # '' (timm's names) | positional | keras (a Keras 2 .h5) | a CSV rename table (checkpoint,timm)
    "data_config",  # JSON overriding timm's data config (mean, std, input_size, crop_pct, interpolation)
)

TRAIN_METRICS_KEYS = (
    "model",
    "training",
    "heldout_accuracy",  # fraction in [0, 1] on results/data/heldout.npz
    "n_heldout",
    "epochs",
    "train_seconds",
    "final_train_loss",
    "seed",
)
HISTORY_COLUMNS = (
    "epoch",
    "train_loss",
    "train_ce",
    "train_harmonizer",
    "train_accuracy",
    "train_map_fraction",  # images seen with a human map / images seen
    "lr",
    "seconds",
)

ATTACK_COLUMNS = (
    "image_id",
    "label",
    "clean_pred",
    "attacked",  # clean prediction correct -> attacked; otherwise no attack
    "success",  # attacked and fooled within the search's upper bound
    "censored",  # fooled already at the search's lower bound: epsilon is only an upper bound
    "adv_pred",
    "epsilon",  # smallest successful epsilon (NaN if not success); [0, 1] pixel scale
    "l2",  # ||x_adv - x||_2 in [0,1] pixel units at the model's input size
    "linf",  # ||x_adv - x||_inf
    "alignment",  # Spearman rho(|mean_c(x_adv - x)|, human map); NaN if not success
    "grad_evals",  # forward+backward passes spent on this image
    "model",
    "attack",
    "precision",  # fp32 | bf16 | tf32
    "search",  # the search that produced the row (PGDConfig.describe / CWConfig.describe)
)
EXAMPLE_ARRAYS = (
    "image_ids",  # str [K]
    "perturbations",  # float16 [K, H, W, 3]: x_adv - x, zeros where no success
    "images",  # uint8 [K, H, W, 3]: the clean input at the model's resolution
    "maps",  # float32 [K, H, W]: the human map after the same spatial transform
    "success",  # bool [K]
)

MODEL_ATTACK_COLUMNS = (
    "model",
    "attack",
    "arch_class",
    "family",
    "training",
    "base_model",
    "harmonizer_lambda",
    "robust_eps",
    "accuracy",  # percent; held-out accuracy (demo) or ImageNet top-1 (paper)
    "tolerance",  # mean l2 of the minimal successful attack (linf for pgd_linf), [0, 1] pixels; censored excluded
    "tolerance_se",
    "tolerance_255",  # the same on the paper's [0, 255] pixel scale (x 255)
    "tolerance_255_se",
    "tolerance_l2",  # mean l2 of the minimal successful attack, every attack
    "tolerance_l2_se",
    "alignment",
    "alignment_se",
    "n_stimuli",
    "n_attacked",
    "n_success",
    "n_failed",  # attacked but never fooled at the upper bound
    "n_censored",  # fooled at the lower bound: in n_success and the alignment, not in the tolerance
    "n_alignment_undefined",  # fooled, but no alignment: constant (or no) human map or perturbation map
    "search",  # the search that produced the per-image rows (the attack table's search column)
    # Measured cue reliance (synthetic data, results/stats/cue_reliance.csv; NaN elsewhere):
    "part_reliance",  # cue-conflict decisions that follow the human-marked part, fraction in [0, 1]
    "accuracy_part_occluded",  # stimuli accuracy with the marked region noised, fraction in [0, 1]
    "accuracy_context_occluded",  # ... with everything outside it noised
    # Human feature alignment of the model's own saliency (advalign.human_alignment; Table S2):
    "human_alignment",  # mean spearman / the human ceiling 0.65753, x 100 (percent of the ceiling)
    "human_spearman",  # mean per-image Spearman rho of saliency vs human map, [-1, 1]
    "human_dice",  # mean Dice of the two maps' top-10 % pixels, [0, 1]
    "human_iou",  # mean IoU of the same, [0, 1]
    "n_human",  # images with a defined rho (a human map and a non-constant saliency)
    # AutoAttack at a fixed eps (advalign.attacks.autoattack; NaN where it did not run on the model):
    "autoattack_accuracy",  # robust accuracy in percent of the attacked stimuli (clean errors count as broken)
    "autoattack_eps",  # its eps on the [0, 1] pixel scale (x 255 for the paper's scale)
    "autoattack_norm",  # linf | l2
    "autoattack_n",  # stimuli it ran on
    "autoattack_config",  # what ran: version, components, eps (AutoAttackConfig.describe)
    # Attention under attack (advalign.attention; Grad-CAM of the clean image and its minimal
    # main-attack example; NaN where not measured):
    "attention_deviation_k5",  # mean IoU of the top-5 Grad-CAM cells, clean vs attacked, [0, 1]
    "attention_deviation_k10",
    "attention_deviation_k20",
    "attention_deviation_k30",
    "attention_human_iou",  # mean IoU of the clean map's top cells with the human-marked region, area matched
    "attention_tolerance_rho",  # Spearman rho over images: attention-human IoU vs l2 tolerance
    "attention_tolerance_p",
    "attention_layer",  # the Grad-CAM layer and its grid, e.g. "layer1 8x8"
    "n_attention",  # images with both maps
)
ROBUSTNESS_IN_MODEL_TABLE = ("autoattack_accuracy", "autoattack_eps", "autoattack_norm", "autoattack_n",
                             "autoattack_config")
ATTENTION_IN_MODEL_TABLE = (
    "attention_deviation_k5",
    "attention_deviation_k10",
    "attention_deviation_k20",
    "attention_deviation_k30",
    "attention_human_iou",
    "attention_tolerance_rho",
    "attention_tolerance_p",
    "attention_layer",
    "n_attention",
)
# Seed 004's top-k cells of the attention deviation.
ATTENTION_TOP_K = (5, 10, 20, 30)
# results/attention/{model}.csv (advalign.attention): one row per stimulus with a kept main-attack example.
ATTENTION_COLUMNS = (
    "image_id",
    "label",
    "success",  # the main attack fooled the model (its example is attacked)
    "tolerance",  # the main attack's per-image l2 (NaN where not measured: failed or censored)
    "adv_pred",  # the model's prediction on the kept example (the Grad-CAM target on it)
    "deviation_k5",  # IoU of the top-k cells of the clean and attacked maps (NaN: k >= cells)
    "deviation_k10",
    "deviation_k20",
    "deviation_k30",
    "human_iou",  # IoU of the clean map's top cells with the human region's cells, area matched
    "human_cells",  # k of that IoU: the human region's area in cells
    "cells",  # cells of the Grad-CAM grid
    "layer",
)
RELIANCE_IN_MODEL_TABLE = ("part_reliance", "accuracy_part_occluded", "accuracy_context_occluded")
HUMAN_IN_MODEL_TABLE = ("human_alignment", "human_spearman", "human_dice", "human_iou", "n_human")
# results/human_alignment/{model}.csv (advalign.human_alignment): one row per stimulus with a map.
HUMAN_ALIGNMENT_COLUMNS = ("image_id", "label", "clean_pred", "spearman", "dice", "iou")
TEST_KEYS = ("name", "test", "statistic", "df", "p_value", "n", "detail")
CLAIM_COLUMNS = (
    "claim",
    "source",  # where the paper states it (section, figure, appendix)
    "paper_value",
    "recomputed_value",
    "recomputed_p",
    "recomputed_df",  # degrees of freedom of the recomputed test (NaN for counts and values)
    "n",  # models, images or model pairs behind the recomputed value
    "agrees",  # True/False by the criterion in `note`; empty where it cannot be computed
    "note",  # the agreement criterion, and why a value is missing
)
TABLE_S1_COLUMNS = ("arch_class", "family", "count")
TABLE_S2_COLUMNS = (
    "model",
    "base_model",
    "harmonizer_lambda",
    "accuracy",  # percent
    "control_accuracy",
    "alignment",  # adversarial alignment of l2-PGD (rho_s), not Table S2's quantity
    "base_alignment",
    "human_alignment",  # Table S2's "Human Alignment (%)": saliency vs ClickMe, percent of the human ceiling
    "base_human_alignment",
    "paper_model",  # the row of the paper's Table S2 this model is (empty: none)
    "paper_accuracy",
    "paper_human_alignment",
    "source",  # trained (by this pipeline) | released (the authors' file, imported) | not released
)

