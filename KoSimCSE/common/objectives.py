"""The flags of the newer training objectives (CoSENT/AnglE, hardness-weighted and bidirectional InfoNCE,
Matryoshka) in sentence-transformers' semantics, with defaults that keep every published preset exact. The
losses themselves are in each method's model.py; here are only their flags, defaults and checks."""
import math

OBJECTIVE_DEFAULTS = {"sts_loss": "cosine", "hardness_mode": None, "hardness_strength": 0.0,
                      "infonce_directions": ["query_to_doc"], "infonce_partition": "joint", "matryoshka_dims": [],
                      "matryoshka_weights": None}


def objective_option(args, name):
    return getattr(args, name, OBJECTIVE_DEFAULTS[name])


def infonce_options(args):
    """contrastive_loss's keyword options from the flags (their defaults: plain InfoNCE)."""
    return {"hardness_mode": objective_option(args, "hardness_mode"),
            "hardness_strength": objective_option(args, "hardness_strength"),
            "directions": tuple(objective_option(args, "infonce_directions")),
            "partition": objective_option(args, "infonce_partition")}


def add_objective_args(p, sts_losses=(), hardness_modes=(), directions=(), matryoshka=True):
    """The flags of the newer objectives (sentence-transformers' semantics; the defaults keep every preset as
    published): --sts_loss where an STS regression objective exists, the InfoNCE options where InfoNCE is
    used, --matryoshka_dims / --matryoshka_weights where the loss is on the saved embedding. A method passes
    the choices its model.py implements (STS_LOSSES; HARDNESS_MODES and INFONCE_DIRECTIONS); none: no flag."""
    d = OBJECTIVE_DEFAULTS
    if sts_losses:
        p.add_argument("--sts_loss", choices=tuple(sts_losses), default=d["sts_loss"],
                       help="STS objective: cosine (SBERT's MSE of cos vs score/5), cosent (CoSENTLoss) or angle "
                            "(AnglELoss), both ranking every pair of the batch against every other, scale 20")
    if hardness_modes or directions:
        p.add_argument("--hardness_mode", choices=hardness_modes, default=d["hardness_mode"],
                       help="InfoNCE hardness weighting (MultipleNegativesRankingLoss): add hardness_strength * "
                            "cos (no gradient) to the logits of in_batch_negatives, hard_negatives or all_negatives")
        p.add_argument("--hardness_strength", type=float, default=d["hardness_strength"],
                       help="alpha of --hardness_mode (Lan et al. use 9 for in-batch, EmbeddingGemma 5 for hard)")
        p.add_argument("--infonce_directions", nargs="+", choices=directions, default=d["infonce_directions"],
                       help="InfoNCE terms: query_to_doc (always) plus doc_to_query (bidirectional), query_to_query, "
                            "doc_to_doc (all four, joint: GTE's)")
        p.add_argument("--infonce_partition", choices=("joint", "per_direction"), default=d["infonce_partition"],
                       help="one softmax over all --infonce_directions (joint) or one per direction, averaged")
    if matryoshka:
        p.add_argument("--matryoshka_dims", nargs="*", type=int, default=d["matryoshka_dims"],
                       help="Matryoshka: the loss summed over these truncated, re-normalised dimensions (e.g. "
                            "768 512 256 128 64; include the full one); recorded in the saved folder; empty = off")
        p.add_argument("--matryoshka_weights", nargs="+", type=float, default=d["matryoshka_weights"],
                       help="one weight per --matryoshka_dims (default 1 each)")


def check_objective_args(p, args):
    """The combinations the objective flags refuse (sentence-transformers refuses the same)."""
    directions = objective_option(args, "infonce_directions")
    if "query_to_doc" not in directions:
        p.error("--infonce_directions must include query_to_doc (it holds the positive pair)")
    if objective_option(args, "infonce_partition") == "per_direction" and {"query_to_query", "doc_to_doc"} & set(directions):
        p.error("--infonce_partition per_direction cannot take query_to_query or doc_to_doc (their softmax has no "
                "positive); use joint")
    if objective_option(args, "hardness_strength") < 0:
        p.error("--hardness_strength must be non-negative")
    dims, weights = objective_option(args, "matryoshka_dims"), objective_option(args, "matryoshka_weights")
    if any(dim <= 0 for dim in dims):
        p.error("--matryoshka_dims must be positive")
    if len(set(dims)) != len(dims):
        p.error(f"--matryoshka_dims {' '.join(map(str, dims))}: a dimension given twice would count twice in the loss")
    if weights is not None and len(weights) != len(dims):
        p.error(f"--matryoshka_weights takes one weight per --matryoshka_dims ({len(dims)})")
    if weights is not None and not all(math.isfinite(w) and w >= 0 for w in weights):
        p.error(f"--matryoshka_weights {' '.join(map(str, weights))}: each must be a finite number >= 0")
    if weights is not None and dims and sum(weights) == 0:
        p.error("--matryoshka_weights are all 0: nothing would train")
    strength = objective_option(args, "hardness_strength")
    if not math.isfinite(strength):
        p.error(f"--hardness_strength {strength}: must be a finite number")
