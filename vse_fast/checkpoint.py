"""Checkpoints: atomic save, safe load (``torch.load(weights_only=True)`` only), RNG states, and
loading of published VSE-infinity checkpoints into a VSEModel.

Our schema ("vse_fast/1")::

    {"format": "vse_fast/1", "model": model.state_dict() (no "module." prefix), "optimizer": ...,
     "scaler": ..., "epoch": int, "epoch_step": int (steps done in that epoch), "step": int,
     "best_rsum": float, "train_pairs": int (training captions; a mid-epoch resume needs the same),
     "rng": {"per_rank": [capture_rng_state() of each rank], "world_size": int},
     "config": dict of plain types holding the model options (``model.opt``), at top level or
               under config["model"]}

Published checkpoints (woodfrog/vse_infty train.py)::

    {"epoch": int, "model": [img_enc.state_dict(), txt_enc.state_dict()], "best_rsum": float,
     "opt": argparse.Namespace, "Eiters": int}      (keys "module."-prefixed under DataParallel)

Nothing is ever unpickled beyond tensors and plain containers: ``argparse.Namespace`` is
allow-listed, and numpy scalars (seen in some checkpoints) are rebuilt by a function that accepts
only numeric dtypes and returns Python numbers. Anything else fails with CheckpointError naming
the offending globals; there is no ``weights_only=False`` fallback.
"""
from __future__ import annotations

import argparse
import os
import pickle
import random
import re
import struct
import uuid
import warnings
from typing import Any

import numpy as np
import torch

from vse_fast.model import VSEModel, build_model, model_defaults, resolve_model_options

FORMAT = "vse_fast/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


class _NumericDtype:
    """Stand-in for ``numpy.dtype`` while unpickling: accepts only the numeric type codes numpy pickles
    ('b1', 'i1'..'u8', 'f2'..'f8') and, from the pickled state, only a byte order; anything else (a
    subarray, fields, an object dtype) is refused. numpy's own dtype and DType classes are not
    allow-listed: their ``__setstate__`` takes states that make a float dtype hold objects."""

    _CODES = ("b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8")

    def __init__(self, code, align=False, copy=True):
        if not isinstance(code, str) or code not in self._CODES:
            raise pickle.UnpicklingError(f"refusing to rebuild numpy dtype {code!r}")
        self.code, self.byteorder = code, "="

    def __setstate__(self, state):
        plain = (isinstance(state, tuple) and len(state) == 8 and state[0] == 3 and isinstance(state[1], str)
                 and len(state[1]) == 1 and state[1] in "<>|=" and state[2:5] == (None, None, None))
        if not plain:
            raise pickle.UnpicklingError(f"refusing numpy dtype state {state!r}")
        self.byteorder = state[1]

    def numpy(self) -> np.dtype:
        return np.dtype(self.code).newbyteorder(self.byteorder if self.byteorder in "<>" else "=")


def _real_dtypes(obj):
    """``obj`` with each `_NumericDtype` stand-in (a bare numpy dtype in the checkpoint) as the numpy
    dtype it stands for, in dicts, lists, tuples and Namespaces."""
    if isinstance(obj, _NumericDtype):
        return obj.numpy()
    if isinstance(obj, dict):
        for key, value in obj.items():
            obj[key] = _real_dtypes(value)
        return obj
    if isinstance(obj, list):
        return [_real_dtypes(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_real_dtypes(v) for v in obj)
    if isinstance(obj, argparse.Namespace):
        for key, value in vars(obj).items():
            setattr(obj, key, _real_dtypes(value))
    return obj


def _numpy_scalar(dtype, data=None):
    """Safe stand-in for numpy's scalar reconstructor: a numeric `_NumericDtype` and exactly its
    itemsize of bytes; returns a Python number."""
    if not isinstance(dtype, _NumericDtype) or not isinstance(data, bytes):
        raise pickle.UnpicklingError(f"refusing to rebuild a numpy scalar of dtype {dtype!r}")
    clean = dtype.numpy()
    if len(data) != clean.itemsize:
        raise pickle.UnpicklingError(f"numpy scalar of dtype {clean} needs {clean.itemsize} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=clean, count=1)[0].item()


SAFE_GLOBALS = [
    argparse.Namespace,
    (_numpy_scalar, "numpy.core.multiarray.scalar"),
    (_numpy_scalar, "numpy._core.multiarray.scalar"),
    (_NumericDtype, "numpy.dtype"),
]


def _temporary_path(path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")


def remove_stale_temporaries(path: str) -> list:
    """Delete the temporary files that saves of ``path`` killed before their rename left beside it
    (SIGKILL or SIGTERM mid-save: each as large as a checkpoint) and return their paths. Only for a
    path no other process is saving at the same time."""
    directory = os.path.dirname(os.path.abspath(path))
    pattern = re.compile(rf"\.{re.escape(os.path.basename(path))}\.[0-9a-f]{{32}}\.tmp")
    removed = []
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else ():
        if pattern.fullmatch(name):
            os.remove(os.path.join(directory, name))
            removed.append(os.path.join(directory, name))
    return removed


def copy_checkpoint(source: str, target: str) -> None:
    """Copy ``source`` to ``target`` as save_checkpoint writes: a temporary file, fsync, os.replace,
    then the directory's fsync."""
    import shutil

    tmp = _temporary_path(target)
    try:
        with open(source, "rb") as src, open(tmp, "xb") as dst:
            shutil.copyfileobj(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_directory(os.path.dirname(os.path.abspath(target)))


def _fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable (best effort; not possible on every platform)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def save_checkpoint(path: str, state: dict) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same directory, fsync, then
    os.replace, so a crash never leaves a truncated checkpoint under ``path``. The file gets the
    permissions a plain open() gives (0o666 minus the umask), not mkstemp's private 0o600."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = _temporary_path(path)
    # O_EXCL as mkstemp, but mode 0o666: the kernel applies the umask exactly as for open(path, "wb").
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_directory(directory)


def load_checkpoint(path: str, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with argparse.Namespace and numeric numpy scalars
    allow-listed. FileNotFoundError for a missing file, CheckpointError for anything else unreadable."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist or is not a file")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return _real_dtypes(torch.load(path, map_location=map_location, weights_only=True))
    except pickle.UnpicklingError as err:
        try:
            with torch.serialization.safe_globals(SAFE_GLOBALS):  # only the globals we do not allow
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # not a zip checkpoint, etc.
            unsafe = []
        reason = _unpickler_reason(err)
        if not unsafe and "refusing" in reason:  # an allow-listed numpy stand-in refused its arguments
            raise CheckpointError(f"checkpoint {path!r} cannot be loaded safely (weights_only=True): {reason}. "
                                  "vse_fast never unpickles arbitrary objects.") from err
        if not unsafe and "GLOBAL" not in reason:  # no object refused: the file is no torch.save output
            raise CheckpointError(f"checkpoint {path!r} is not a readable torch checkpoint: {reason}") from err
        detail = f"it references {unsafe}, which are not allow-listed" if unsafe else reason
        raise CheckpointError(f"checkpoint {path!r} cannot be loaded safely (weights_only=True): {detail}. "
                              "vse_fast never unpickles arbitrary objects.") from err
    except (RuntimeError, EOFError, OSError) as err:
        detail = str(err) or ("empty or truncated file" if isinstance(err, EOFError) else type(err).__name__)
        raise CheckpointError(f"checkpoint {path!r} is not a readable torch checkpoint: {detail}") from err
    # e.g. a text file; struct.error, AssertionError, LookupError: a corrupt legacy (non-zip) checkpoint
    except (IndexError, KeyError, ValueError, TypeError, AttributeError, struct.error, AssertionError,
            LookupError) as err:
        raise CheckpointError(f"checkpoint {path!r} is not a readable torch checkpoint "
                              f"({type(err).__name__}: {err})") from err


def _unpickler_reason(err: pickle.UnpicklingError) -> str:
    """The weights-only unpickler's own reason ("Unsupported operand 147", "Trying to load unsupported
    GLOBAL ..."), without torch's advice paragraphs around it."""
    paragraphs = [p.strip() for p in str(err).split("\n\n") if p.strip()]
    paragraphs = [p for p in paragraphs if not p.startswith("Check the documentation")]
    return paragraphs[-1].splitlines()[-1].rstrip(".") if paragraphs else type(err).__name__


# ----------------------------------------------------------------------------- RNG states

def capture_rng_state(device: torch.device | str | None = None) -> dict:
    """RNG states of python, numpy, torch CPU and the CUDA device this process uses (``device``; None:
    the current CUDA device when CUDA is available; a CPU device: no CUDA state), as tensors and plain
    types (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    index = _cuda_index(device)
    if index is not None:
        state["cuda"] = torch.cuda.get_rng_state(index)
    return state


def restore_rng_state(state: dict, device: torch.device | str | None = None) -> None:
    """Inverse of capture_rng_state; the CUDA state goes to ``device`` (as there). Checkpoints of older
    versions hold a list with every visible device's state: the entry of this device's index is
    restored, and a warning says when the list has none (resumed with fewer visible GPUs)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state((nps["kind"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"],
                         nps["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    index = _cuda_index(device)
    saved = state.get("cuda")
    if saved is None or index is None:
        return
    if isinstance(saved, (list, tuple)):
        if index >= len(saved):
            warnings.warn(f"the checkpoint holds CUDA RNG states of {len(saved)} device(s), none for cuda:{index}: "
                          "its random stream (dropout on the GPU) starts from the current state", stacklevel=2)
            return
        saved = saved[index]
    torch.cuda.set_rng_state(saved.cpu(), index)


def _cuda_index(device) -> int | None:
    """The CUDA device index whose RNG state is saved and restored, or None."""
    if not torch.cuda.is_available():
        return None
    if device is None:
        return torch.cuda.current_device()
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


# ----------------------------------------------------------------------------- our checkpoints

def strip_prefixes(state_dict: dict, prefixes=("module.", "_orig_mod."), *, path: str | None = None) -> dict:
    """Remove DataParallel/DDP ("module.") and torch.compile ("_orig_mod.") key prefixes, and the
    "_orig_mod" of a compiled submodule inside a key ("txt_enc.bert._orig_mod.x" from
    ``model.txt_enc.bert = torch.compile(model.txt_enc.bert)``). Two keys that become one (e.g. "X"
    and "module.X") raise CheckpointError naming both (and ``path``)."""
    out, original = {}, {}
    for raw_key, value in state_dict.items():
        key, changed = raw_key, True
        while changed:
            changed = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        if "_orig_mod." in prefixes:
            key = ".".join(part for part in key.split(".") if part != "_orig_mod")
        if key in out:
            where = f"checkpoint {path!r}: " if path else ""
            raise CheckpointError(f"{where}keys {original[key]!r} and {raw_key!r} both become {key!r} without "
                                  f"the {list(prefixes)} prefixes")
        out[key], original[key] = value, raw_key
    return out


def _check_state_dict(state_dict: Any, path: str, what: str) -> dict:
    """A state dict must map keys to tensors; CheckpointError naming the file and the first offender."""
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"checkpoint {path!r}: {what} must be a state dict, got {type(state_dict).__name__}")
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"checkpoint {path!r}: {what} entry {key!r} is {type(value).__name__}, "
                                  "not a tensor")
    return state_dict


def _load_strict(model: VSEModel, state_dict: dict, path: str) -> None:
    own = model.state_dict()
    # transformers 4 saved BertEmbeddings.position_ids / token_type_ids buffers; 5 does not persist them.
    state_dict = {k: v for k, v in state_dict.items()
                  if k in own or not k.endswith(("embeddings.position_ids", "embeddings.token_type_ids"))}
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path!r} does not fit the model: missing keys {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                              f"{' ...' if len(unexpected) > 8 else ''}")
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state_dict.items() if v.shape != own[k].shape]
    if wrong:
        raise CheckpointError(f"checkpoint {path!r}: shape mismatch (key, checkpoint, model) {wrong[:5]}")
    model.load_state_dict(state_dict, strict=True)


def model_options_from_config(config: dict) -> dict:
    """Model options stored in a checkpoint config (top level, or under config["model"])."""
    if isinstance(config.get("model"), dict):
        return dict(config["model"])
    return dict(config)


def load_model_checkpoint(path: str, map_location: Any = "cpu", *, gpo_backend: str = "auto",
                          **option_overrides) -> tuple[VSEModel, dict]:
    """Rebuild the VSEModel of one of our checkpoints (random BERT init, then the stored weights).
    ``gpo_backend`` is chosen for this machine, not taken from the training run (a run trained with
    'triton' on a GPU still evaluates on a CPU); ``option_overrides`` (e.g. text_model) replace
    stored model options. Returns (model in eval mode, the checkpoint dict)."""
    return _model_from_state(load_checkpoint(path, map_location), path, gpo_backend=gpo_backend, **option_overrides)


def _model_from_state(state: Any, path: str, **option_overrides) -> tuple[VSEModel, dict]:
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {path!r} is not a {FORMAT} checkpoint (format: {found!r}); "
                              "published VSE-infinity checkpoints load with load_published_checkpoint")
    config = state.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {path!r} has no 'config' dict with the model options")
    if "model" not in state:
        raise CheckpointError(f"checkpoint {path!r} has no 'model' state dict (keys: {list(state)})")
    unknown = sorted(set(option_overrides) - set(model_defaults()))
    if unknown:
        raise TypeError(f"unknown model option(s) {unknown}: the options are {sorted(model_defaults())}")
    weights = strip_prefixes(_check_state_dict(state["model"], path, "'model'"), path=path)
    options = model_options_from_config(config)
    options.update(option_overrides)
    if option_overrides.get("text_model") or option_overrides.get("bert_config"):
        options["bert_config_dict"] = None  # an explicit BERT source replaces the stored config
    try:
        model = build_model(options, load_pretrained=False)
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path!r}: {err}") from err
    _load_strict(model, weights, path)
    return model.eval(), state


# ----------------------------------------------------------------------------- published checkpoints

def _split_published_image_state(img_sd: dict, path: str) -> dict:
    if any(k.startswith(("backbone.", "image_encoder.")) for k in img_sd):
        dropped = sorted({k.split(".")[0] + "." + k.split(".")[1] for k in img_sd if k.startswith("backbone.")})
        if dropped:
            warnings.warn(f"{path}: the published CNN backbone weights ({dropped[:4]} ...) are not used: "
                          "vse_fast encodes precomputed features (extract them with that backbone)")
        img_sd = {k[len("image_encoder."):]: v for k, v in img_sd.items() if k.startswith("image_encoder.")}
    return img_sd


def _count_layers(state: dict, prefix: str) -> int:
    indices = {int(k[len(prefix):].split(".")[0].split("_")[0]) for k in state if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def _bert_config_from_state(txt_sd: dict, path: str) -> dict:
    """bert-base(-uncased)-shaped config inferred from the weights (the published text encoder
    always used bert-base-uncased). Other sizes need the BERT directory (text_model)."""
    import transformers

    needed = ["bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.intermediate.dense.weight",
              "bert.embeddings.position_embeddings.weight", "bert.embeddings.token_type_embeddings.weight"]
    missing = [key for key in needed if key not in txt_sd]
    if missing:
        raise CheckpointError(f"checkpoint {path!r}: the BERT text encoder's weights lack {missing}, which "
                              "its size is read from; pass text_model (the BERT directory) or bert_config")
    vocab, hidden = txt_sd["bert.embeddings.word_embeddings.weight"].shape
    if hidden != 768:
        raise CheckpointError(f"checkpoint {path!r}: BERT hidden size {hidden} is not bert-base's 768; pass "
                              "text_model (the BERT directory it was trained with) or bert_config")
    config = transformers.BertConfig(
        vocab_size=vocab, hidden_size=hidden,
        num_hidden_layers=_count_layers(txt_sd, "bert.encoder.layer."),
        num_attention_heads=12,
        intermediate_size=txt_sd["bert.encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=txt_sd["bert.embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=txt_sd["bert.embeddings.token_type_embeddings.weight"].shape[0])
    return config.to_dict()


def _opt_flag(opt: dict, key: str, path: str) -> bool:
    """A boolean flag of the published opt: absent/None is False; True/False/1/0 only (a string such
    as "False" would be truthy)."""
    value = opt.get(key)
    if value is None:
        return False
    if isinstance(value, (bool, int)) and value in (0, 1):
        return bool(value)
    raise CheckpointError(f"checkpoint {path!r}: opt.{key} must be True or False, got {value!r}")


def _check_against_opt(inferred: dict, opt: dict, path: str) -> None:
    for key, value in inferred.items():
        if key in opt and opt[key] is not None and opt[key] != value:
            raise CheckpointError(f"checkpoint {path!r}: opt.{key}={opt[key]!r} but the weights say {value!r}")


def load_published_checkpoint(path: str, text_model: str | None = None, *, bert_config: str | None = None,
                              map_location: Any = "cpu", gpo_backend: str = "auto") -> tuple[VSEModel, dict]:
    """Load a published VSE-infinity checkpoint into a VSEModel (eval mode), for evaluation or fine-tuning.

    Architecture from the weights (embed_size, img_dim, precomp_enc_type, BERT vs BiGRU and its sizes),
    cross-checked with the checkpoint's ``opt``; ``no_imgnorm``/``no_txtnorm`` from ``opt``. BERT's
    config comes from ``text_model`` (the local BERT directory the checkpoint was trained with; its
    weights are replaced by the checkpoint's) or ``bert_config`` (json); without either, a bert-base
    config is inferred from the weight shapes (12 heads: hidden 768 only). Keys may carry "module.".
    Returns (model, opt_dict): the published opt as a dict plus the resolved model options and
    "epoch", "best_rsum", "Eiters" when present.
    """
    return _published_from_state(load_checkpoint(path, map_location), path, text_model, bert_config, gpo_backend)


def _published_from_state(ckpt: Any, path: str, text_model: str | None, bert_config: str | None,
                          gpo_backend: str) -> tuple[VSEModel, dict]:
    if (not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), (list, tuple)) or len(ckpt["model"]) != 2
            or not all(isinstance(sd, dict) for sd in ckpt["model"])):
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"checkpoint {path!r} is not a published VSE-infinity checkpoint "
                              f"(expected 'model': [img_state, txt_state]; found {found})")
    opt = ckpt.get("opt")
    if opt is not None and not isinstance(opt, (argparse.Namespace, dict)):
        raise CheckpointError(f"checkpoint {path!r}: 'opt' must be an argparse.Namespace or a dict, "
                              f"got {type(opt).__name__}")
    opt = dict(vars(opt)) if isinstance(opt, argparse.Namespace) else dict(opt or {})
    img_sd, txt_sd = (strip_prefixes(_check_state_dict(sd, path, f"'model'[{i}]"), path=path)
                      for i, sd in enumerate(ckpt["model"]))
    img_sd = _split_published_image_state(img_sd, path)
    if "fc.weight" not in img_sd:
        raise CheckpointError(f"checkpoint {path!r}: image encoder state has no fc.weight "
                              f"(keys: {sorted(img_sd)[:6]})")
    embed_size, img_dim = img_sd["fc.weight"].shape
    inferred = dict(embed_size=embed_size, img_dim=img_dim,
                    precomp_enc_type="basic" if "mlp.layers.0.weight" in img_sd else "backbone")
    options = dict(no_imgnorm=_opt_flag(opt, "no_imgnorm", path), no_txtnorm=_opt_flag(opt, "no_txtnorm", path),
                   gpo_backend=gpo_backend)
    if "bert.embeddings.word_embeddings.weight" in txt_sd:
        options["text_encoder"] = "bert"
        if text_model or bert_config:
            options.update(text_model=text_model, bert_config=bert_config)
        else:
            options["bert_config_dict"] = _bert_config_from_state(txt_sd, path)
    elif "embed.weight" in txt_sd:
        vocab_size, word_dim = txt_sd["embed.weight"].shape
        inferred.update(vocab_size=vocab_size, word_dim=word_dim)
        options.update(text_encoder="gru", num_layers=_count_layers(txt_sd, "rnn.weight_ih_l"),
                       use_bi_gru="rnn.weight_ih_l0_reverse" in txt_sd)
    else:
        raise CheckpointError(f"checkpoint {path!r}: text encoder state is neither BERT nor BiGRU "
                              f"(keys: {sorted(txt_sd)[:6]})")
    # precomp_enc_type 'backbone' in opt names the end-to-end model; the fc-only part is what we load.
    _check_against_opt({k: v for k, v in inferred.items() if k != "precomp_enc_type"}, opt, path)
    opt_enc = opt.get("precomp_enc_type")
    if opt_enc is not None and (opt_enc == "basic") != (inferred["precomp_enc_type"] == "basic"):
        raise CheckpointError(f"checkpoint {path!r}: opt.precomp_enc_type={opt_enc!r} but the image encoder's "
                              f"weights {'lack' if opt_enc == 'basic' else 'hold'} the region MLP (mlp.*)")
    if options["text_encoder"] == "gru":
        _check_against_opt({"num_layers": options["num_layers"]}, opt, path)
    options.update(inferred)
    try:
        model = build_model(resolve_model_options(options), load_pretrained=False)
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path!r}: {err}") from err
    state = {"img_enc." + k: v for k, v in img_sd.items()}
    state.update({"txt_enc." + k: v for k, v in txt_sd.items()})
    _load_strict(model, state, path)
    info = dict(opt)
    info.update(model.opt)
    for key in ("epoch", "best_rsum", "Eiters"):
        if key in ckpt:
            info[key] = ckpt[key]
    return model.eval(), info


def to_published_state(model: VSEModel) -> list[dict]:
    """Our model's weights as the published ``[img_state, txt_state]`` pair."""
    sd = strip_prefixes(model.state_dict())
    return [{k[len(p):]: v for k, v in sd.items() if k.startswith(p)} for p in ("img_enc.", "txt_enc.")]


def is_published_checkpoint(state: Any) -> bool:
    return isinstance(state, dict) and "format" not in state and isinstance(state.get("model"), (list, tuple))


def load_any_checkpoint(path: str, *, published: bool | None = None, text_model: str | None = None,
                        bert_config: str | None = None, map_location: Any = "cpu",
                        gpo_backend: str = "auto") -> tuple[VSEModel, dict]:
    """Our checkpoint or a published one (``published=None``: detected from the contents).
    ``text_model`` gives a published checkpoint its BERT config; ours store theirs (there it only
    names the tokenizer, see vse_fast.eval.resolve_tokenizer). ``gpo_backend`` is chosen for this
    machine; the one a run trained with is not reused. Returns (model in eval mode, info dict: our
    checkpoint's config, or the published opt)."""
    state = load_checkpoint(path, map_location)
    if published is None:
        published = is_published_checkpoint(state)
    if published:
        return _published_from_state(state, path, text_model, bert_config, gpo_backend)
    # Our checkpoints store their BERT config: text_model only names the tokenizer there.
    overrides = {k: v for k, v in dict(bert_config=bert_config, gpo_backend=gpo_backend).items() if v}
    model, state = _model_from_state(state, path, **overrides)
    return model, dict(state["config"])
