"""Fold LoRA adapters into base weights, and make or apply published weight deltas.

    python merge.py lora --base BASE --adapter ADAPTER --out OUT [--dtype bf16|fp16|fp32|...] [--max-shard-size 5GB]
                         [--into-dequantized]
    python merge.py delta --base BASE --delta DELTA --out OUT
    python merge.py make-delta --base BASE --target TARGET --out DELTA
    each also takes --check SUMS (repeatable): verify inputs against published SHA-256 sums first

`lora`: OUT = BASE with W += scale * B @ A for every adapted layer, and the adapter's
`modules_to_save` tensors (embed_tokens / lm_head of an extended vocabulary...) in place of the
base's; config.json from the base (vocab_size updated), tokenizer files from the adapter folder
if it has them, else from the base.
A QLoRA adapter (adapter_config.json records `base_model_quantization`) was trained against the
NF4-dequantised weights; by default it is still folded into the full-precision base, as PEFT
applies it when loaded over the original model: the output is an ordinary model at the base's
precision with the update added unchanged, and it differs from what training computed by NF4's
rounding of the base (about 10% of each weight's RMS for normal weights; README gives the effect
on logits and loss). `--into-dequantized` folds it into dequantise(quantise(W)) instead, W read
and quantised exactly as the training run did it (in every layer the run quantised, adapted or
not), which gives back the model the adapter was trained with (in fp32; a bf16 run rounded
those weights to bf16 as well).
`delta`: OUT = BASE + DELTA tensor by tensor (as BELLE and PandaLLM publish their models: a
patch for the original LLaMA). A delta with more embed_tokens / lm_head rows than the base (an
extended vocabulary) is added to the base padded with zero rows. config.json and the tokenizer
come from the delta folder. `make-delta` writes DELTA = TARGET - BASE, with the target's config
and tokenizer, for publishing.

Memory. Nothing here ever holds a model: each output tensor is read (one input tensor at a time,
memory-mapped from its safetensors file), computed and written straight into its place in the
output file by checkpoint.py's streamed writer, which writes the header first from the shapes
alone. Peak memory is about two copies of the largest single tensor (the embedding), whatever
the model or shard size (figures in README, from benchmarks/merge_memory.py).

Arithmetic. Sums are formed in fp32 (fp64 when a tensor involved is fp64) and cast once to the
stored dtype. Exactness of `make-delta` then `delta`: an fp32 target cannot in general be
rebuilt bit-exactly from an fp32 delta (where a weight moved towards zero, |t| < |b|/2, the exact
difference t - b needs more than fp32's 24 bits; about 1 element in 100 of a fine-tune). So
make-delta stores, by default, a dtype with room for the differences: fp64 for fp32 targets,
fp32 for bf16/fp16 targets; `delta` then gives back the target bit for bit (unless a weight falls
to within 2^-29 (fp32), 2^-16 (bf16) or 2^-13 (fp16) of zero relative to its base value, which
make-delta would count, as it counts every element that does not come back exactly). A smaller
`--dtype` (fp32 for an fp32 target, bf16 for a bf16 target) halves the files; make-delta then
counts and prints the elements that do not come back exactly and the largest error (about one
fp32 step of |t - b| for fp32; one bf16 step of |t - b|, 2^-8 of the change, for bf16).
In a bf16 `lora` merge an update smaller than half a bf16 step of W is rounded away; merge to
fp32 where that matters.

Every command writes `SHA256SUMS` (sha256sum's format) of its outputs into OUT, and writes OUT
as OUT.tmp first, renamed into place only when complete. `--dtype` takes either spelling
(bf16 or bfloat16, fp32 or float32...).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from nanotune.checkpoint import (
    DTYPES, IGNORED_TENSORS, SAFETENSORS_DTYPES, CheckpointError, parse_dtype, sha256_of, weight_files,
    write_hf_checkpoint,
)
from nanotune.data.records import DataError
from nanotune.lora import PEFT_PREFIX, one_name_for_tied_embedding, read_adapter_config, read_adapter_tensors
from nanotune.quant import BLOCK_SIZE, METHOD, SCALE_BLOCK_SIZE, dequantize_nf4, quantize_nf4

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")
VOCABULARY_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")  # rows = vocabulary size


class MergeError(ValueError):
    """Inputs that do not fit together (names, shapes) or fail their published checksums."""


# ----------------------------------------------------------------------------------------------
# Reading and writing one tensor at a time
# ----------------------------------------------------------------------------------------------


class WeightReader:
    """Name, shape and dtype of every tensor of a HF folder (from the file headers), and one
    tensor at a time on request. A safetensors file is opened for each tensor and closed again,
    so only that tensor's pages are ever mapped."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.file_of: dict[str, Path] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        self.dtype: dict[str, torch.dtype] = {}
        self._pickled: tuple[Path, dict] | None = None  # the last .bin file read (memory-mapped)
        for file in weight_files(self.folder):
            for name, shape, dtype in self._headers(file):
                if IGNORED_TENSORS.search(name):
                    continue
                if not dtype.is_floating_point:
                    raise CheckpointError(f"{file}: tensor {name} is {str(dtype).removeprefix('torch.')}; "
                                          f"model weights must be floating point")
                self.file_of[name], self.shape[name], self.dtype[name] = file, tuple(shape), dtype

    def _headers(self, file: Path):
        if file.suffix != ".safetensors":
            return [(name, t.shape, t.dtype) for name, t in self._load_pickled(file).items()]
        try:
            with safe_open(str(file), framework="pt") as f:
                slices = [(name, f.get_slice(name)) for name in f.keys()]
                return [(name, s.get_shape(), SAFETENSORS_DTYPES[s.get_dtype()]) for name, s in slices]
        except Exception as error:
            raise CheckpointError(f"{file}: cannot read safetensors header ({error})") from None

    def _load_pickled(self, file: Path) -> dict:
        if self._pickled is None or self._pickled[0] != file:
            try:
                self._pickled = (file, torch.load(file, map_location="cpu", weights_only=True, mmap=True))
            except Exception as error:
                raise CheckpointError(f"{file}: cannot read PyTorch weights file ({error})") from None
        return self._pickled[1]

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def names(self) -> list[str]:
        return list(self.file_of)

    def get(self, name: str) -> torch.Tensor:
        file = self.file_of[name]
        if file.suffix != ".safetensors":
            return self._load_pickled(file)[name]
        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(name)


def write_model_folder(out: Path, config: dict, specs: dict, get_tensor, max_shard_size: str | int,
                       copy_files: list[Path], description: str) -> None:
    """OUT.tmp gets the shards (+ index), config.json, `copy_files` and SHA256SUMS; then it becomes OUT."""
    with tqdm(total=len(specs), unit="tensor", desc=description, disable=None) as progress:

        def get_and_count(name: str) -> torch.Tensor:
            tensor = get_tensor(name)
            progress.update()
            return tensor

        write_hf_checkpoint(out, config, specs, get_and_count, max_shard_size, copy_files=copy_files, checksums=True)


def side_files(primary: Path, fallback: Path) -> list[Path]:
    """Tokenizer files (from `primary` if it has any, else `fallback`) and generation_config.json."""
    tokenizer = [primary / n for n in TOKENIZER_FILES if (primary / n).exists()]
    if not tokenizer:
        tokenizer = [fallback / n for n in TOKENIZER_FILES if (fallback / n).exists()]
    generation = [d / "generation_config.json" for d in (primary, fallback) if (d / "generation_config.json").exists()]
    return tokenizer + generation[:1]


def read_config_dict(folder: Path) -> dict:
    file = folder / "config.json"
    if not file.exists():
        raise CheckpointError(f"{folder}: no config.json in this folder (is it a HF-format model?)")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{file}:{error.lineno}: invalid JSON ({error.msg})") from None


def config_dtype(config: dict) -> torch.dtype | None:
    """The dtype config.json declares (`torch_dtype`, or `dtype` as transformers 5 writes it)."""
    name = config.get("torch_dtype") or config.get("dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else None


def set_config_dtype(config: dict, dtype: torch.dtype) -> None:
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if "dtype" in config:
        config["dtype"] = config["torch_dtype"]


def arithmetic_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp32, or fp64 when any tensor involved is fp64 (so an fp64 delta is not rounded first)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


# ----------------------------------------------------------------------------------------------
# SHA256SUMS (written by checkpoint.write_hf_checkpoint)
# ----------------------------------------------------------------------------------------------


def check_output_folder(out: Path, overwrite: bool) -> None:
    """OUT must be new or empty, or `--overwrite` given: a folder of other models is never replaced by mistake."""
    if out.exists() and not out.is_dir():
        raise MergeError(f"{out}: exists and is not a folder; give --out a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MergeError(f"{out}: is a non-empty folder; merge.py writes only into a new or empty one "
                         f"(pass --overwrite to replace it whole)")


def verify_sha256sums(sums_file: str | Path, folders: list[Path]) -> None:
    """Check every file SUMS lists, in the input folder it describes, before any work is done.

    That folder is the one SUMS sits in, if it is an input folder; otherwise the one input folder
    that holds every listed file. A mismatch fails naming the file.
    """
    sums_file = Path(sums_file)
    if not sums_file.is_file():
        raise DataError(f"{sums_file}: file not found")
    entries = []
    for line_number, line in enumerate(sums_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        match = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](.+)", line.rstrip("\r"))
        if not match:
            raise DataError(f"{sums_file}:{line_number}: expected '<64 hex digits>  <file name>'")
        name = match.group(2)
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise DataError(f"{sums_file}:{line_number}: {name!r} is outside the folder it describes "
                            f"(names must be relative and without '..')")
        entries.append((line_number, match.group(1).lower(), name))
    if not entries:
        raise DataError(f"{sums_file}: lists no file (an empty sums file proves nothing)")
    names = [name for _, _, name in entries]
    home = [f for f in folders if f.resolve() == sums_file.resolve().parent]
    holders = home or [f for f in folders if all((f / name).is_file() for name in names)]
    if not holders:
        raise MergeError(f"{sums_file}: no input folder ({', '.join(map(str, folders))}) holds all the files it lists")
    if len(holders) > 1:
        raise MergeError(f"{sums_file}: both {holders[0]} and {holders[1]} hold its files; "
                         f"put it in the folder it describes")
    folder = holders[0]
    listed = {(folder / name).resolve() for name in names}
    weights = [file for file in folder.iterdir() if file.suffix in (".safetensors", ".bin") and file.is_file()]
    unlisted = [file.name for file in weights if file.resolve() not in listed]
    if unlisted:
        raise MergeError(f"{sums_file}: does not list {', '.join(sorted(unlisted))} of {folder}: "
                         f"every weight file must be checked")
    for line_number, expected, name in tqdm(entries, unit="file", desc=f"checking {sums_file.name}", disable=None):
        file = folder / name
        if not file.is_file():
            raise MergeError(f"{file}: missing (listed in {sums_file}:{line_number})")
        if sha256_of(file) != expected:
            raise MergeError(f"{file}: SHA-256 does not match {sums_file}:{line_number} "
                             f"(corrupted or a different file)")


# ----------------------------------------------------------------------------------------------
# The three commands
# ----------------------------------------------------------------------------------------------


def merge_lora_checkpoint(base: str | Path, adapter: str | Path, out: str | Path, dtype: torch.dtype | None = None,
                          max_shard_size: str | int = "5GB", into_dequantized: bool = False) -> None:
    """OUT = BASE with the adapter folded in: W + scale * B @ A, and `modules_to_save` replaced.

    into_dequantized: for a QLoRA adapter, W is first quantised to NF4 and dequantised, as the
    training run saw it, in every layer the run quantised (those without an adapter too).
    """
    base, adapter, out = Path(base), Path(adapter), Path(out)
    adapter_config = read_adapter_config(adapter)
    quantized = _quantized_weight_rule(adapter, adapter_config.base_quantization) if into_dequantized else None
    config = read_config_dict(base)
    reader = WeightReader(base)
    factors: dict[str, dict[str, torch.Tensor]] = {}  # base weight name -> {"A": (r, in), "B": (out, r)}
    replacements: dict[str, torch.Tensor] = {}
    for peft_name, tensor in read_adapter_tensors(adapter).items():
        name = peft_name.removeprefix(PEFT_PREFIX)
        match = re.fullmatch(r"(.+)\.lora_([AB])\.weight", name)
        if match:
            factors.setdefault(match.group(1) + ".weight", {})[match.group(2)] = tensor
        else:
            replacements[name] = tensor
    if config.get("tie_word_embeddings"):
        replacements = one_name_for_tied_embedding(replacements, adapter)
    problems = [f"{n}: not in the base model" for n in [*factors, *replacements] if n not in reader]
    for name, pair in factors.items():
        if name not in reader:
            continue
        if set(pair) != {"A", "B"}:
            problems.append(f"{name}: the adapter has lora_A or lora_B but not both")
            continue
        if pair["B"].shape[1] != pair["A"].shape[0] or (pair["B"].shape[0], pair["A"].shape[1]) != reader.shape[name]:
            problems.append(f"{name}: lora_B {tuple(pair['B'].shape)} @ lora_A {tuple(pair['A'].shape)} "
                            f"does not fit the base weight {reader.shape[name]}")
    for name, tensor in replacements.items():
        if name in reader and not _fits(name, reader.shape[name], tuple(tensor.shape), allow_more_rows=True):
            problems.append(f"{name}: {tuple(tensor.shape)} in the adapter, {reader.shape[name]} in the base")
    if problems:
        raise MergeError(f"{adapter} does not fit {base}: " + "; ".join(problems))

    specs = {}
    for name in reader.names():
        shape = tuple(replacements[name].shape) if name in replacements else reader.shape[name]
        specs[name] = (shape, dtype or reader.dtype[name])
    vocabulary_rows = {specs[n][0][0] for n in VOCABULARY_TENSORS if n in specs}
    if len(vocabulary_rows) > 1:
        raise MergeError(f"{adapter}: embed_tokens and lm_head would have different numbers of rows "
                         f"({sorted(vocabulary_rows)}); an extended vocabulary needs both in modules_to_save")
    config["vocab_size"] = vocabulary_rows.pop() if vocabulary_rows else config.get("vocab_size")
    if dtype is not None:
        set_config_dtype(config, dtype)

    def get_tensor(name: str) -> torch.Tensor:
        out_dtype = specs[name][1]
        if name in replacements:
            return replacements[name].to(out_dtype)
        weight = reader.get(name)
        if quantized is not None and quantized(name, reader.shape[name]):
            weight = dequantize_nf4(quantize_nf4(weight))  # fp32: what the NF4 layer computed with
        if name not in factors:
            return weight.to(out_dtype)
        compute = arithmetic_dtype(weight.dtype, out_dtype)
        A, B = factors[name]["A"].to(compute), factors[name]["B"].to(compute)
        return (weight.to(compute) + (B @ A) * adapter_config.scale).to(out_dtype)  # (out, in)

    write_model_folder(out, config, specs, get_tensor, max_shard_size, side_files(adapter, base), "merging LoRA")


def _quantized_weight_rule(adapter: Path, record: dict | None):
    """name, shape -> whether the QLoRA run held this base weight in NF4 (from adapter_config.json)."""
    if not record:
        raise MergeError(f"{adapter}: --into-dequantized needs a QLoRA adapter; its adapter_config.json has "
                         f"no base_model_quantization (the base was not quantised)")
    expected = {"method": METHOD, "block_size": BLOCK_SIZE, "scale_block_size": SCALE_BLOCK_SIZE}
    if any(record.get(key) != value for key, value in expected.items()):
        raise MergeError(f"{adapter}: base_model_quantization {record} is not nanotune's NF4 ({expected})")
    targets = set(record.get("targets") or [])

    def rule(name: str, shape: tuple) -> bool:
        module = name.removesuffix(".weight")
        return (name.startswith("model.layers.") and name.endswith(".weight") and len(shape) == 2
                and module.rsplit(".", 1)[-1] in targets)

    return rule


def _fits(name: str, base_shape: tuple, other_shape: tuple, allow_more_rows: bool) -> bool:
    """Same shape, or (for embed_tokens / lm_head) more rows: an extended vocabulary."""
    if base_shape == other_shape:
        return True
    return (allow_more_rows and name in VOCABULARY_TENSORS and len(base_shape) == 2
            and other_shape[1:] == base_shape[1:] and other_shape[0] > base_shape[0])


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """The base's rows, then zeros for the rows an extended vocabulary added. (rows, C)"""
    if tensor.shape[0] == rows:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


def _paired_readers(base: Path, other: Path, other_role: str) -> tuple[WeightReader, WeightReader]:
    """Readers of two folders whose tensors must correspond one to one (up to extra vocabulary rows)."""
    base_reader, other_reader = WeightReader(base), WeightReader(other)
    problems = [f"{n}: not in the base" for n in other_reader.names() if n not in base_reader]
    problems += [f"{n}: not in the {other_role}" for n in base_reader.names() if n not in other_reader]
    problems += [
        f"{n}: {other_reader.shape[n]} in the {other_role}, {base_reader.shape[n]} in the base"
        for n in other_reader.names()
        if n in base_reader and not _fits(n, base_reader.shape[n], other_reader.shape[n], allow_more_rows=True)
    ]
    if problems:
        raise MergeError(f"{other} does not fit {base}: " + "; ".join(problems))
    return base_reader, other_reader


def apply_delta(base: str | Path, delta: str | Path, out: str | Path, dtype: torch.dtype | None = None,
                max_shard_size: str | int = "5GB") -> None:
    """OUT = BASE + DELTA, tensor by tensor, in the dtype the delta's config.json declares (the target's)."""
    base, delta, out = Path(base), Path(delta), Path(out)
    config = read_config_dict(delta)
    base_reader, delta_reader = _paired_readers(base, delta, "delta")
    out_dtype = dtype or config_dtype(config)
    specs = {n: (delta_reader.shape[n], out_dtype or base_reader.dtype[n]) for n in delta_reader.names()}
    if dtype is not None:
        set_config_dtype(config, dtype)

    def get_tensor(name: str) -> torch.Tensor:
        shape, target_dtype = specs[name]
        difference = delta_reader.get(name)
        weight = _pad_rows(base_reader.get(name), shape[0])
        compute = arithmetic_dtype(weight.dtype, difference.dtype, target_dtype)
        return (weight.to(compute) + difference.to(compute)).to(target_dtype)

    write_model_folder(out, config, specs, get_tensor, max_shard_size, side_files(delta, base), "applying delta")


def make_delta(base: str | Path, target: str | Path, out: str | Path, dtype: torch.dtype | None = None,
               max_shard_size: str | int = "5GB") -> dict:
    """DELTA = TARGET - BASE, with the target's config and tokenizer. Returns the round-trip count.

    Each tensor is added back exactly as `delta` will add it, and elements that do not give the
    target bit for bit are counted: {"elements", "inexact", "max_error"}.
    """
    base, target, out = Path(base), Path(target), Path(out)
    config = read_config_dict(target)
    base_reader, target_reader = _paired_readers(base, target, "target")
    target_dtypes = {n: target_reader.dtype[n] for n in target_reader.names()}
    stored_dtypes = set(target_dtypes.values())
    rebuilt_dtype = config_dtype(config) or (stored_dtypes.pop() if len(stored_dtypes) == 1 else None)
    if rebuilt_dtype is not None:
        set_config_dtype(config, rebuilt_dtype)  # `delta` rebuilds in this dtype

    def exact_dtype(target_dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if target_dtype in (torch.float32, torch.float64) else torch.float32

    specs = {n: (target_reader.shape[n], dtype or exact_dtype(target_dtypes[n])) for n in target_reader.names()}
    report = {"elements": 0, "inexact": 0, "max_error": 0.0}

    def get_tensor(name: str) -> torch.Tensor:
        shape, delta_dtype = specs[name]
        wanted = target_reader.get(name)
        weight = _pad_rows(base_reader.get(name), shape[0])
        compute = arithmetic_dtype(weight.dtype, wanted.dtype, delta_dtype)
        difference = (wanted.to(compute) - weight.to(compute)).to(delta_dtype)
        # Add it back exactly as `delta` will (same dtypes, same order) and compare bit for bit.
        rebuilt_as = rebuilt_dtype or base_reader.dtype[name]
        compute_back = arithmetic_dtype(weight.dtype, delta_dtype, rebuilt_as)
        rebuilt = (weight.to(compute_back) + difference.to(compute_back)).to(rebuilt_as)
        wrong = rebuilt != wanted.to(rebuilt_as)
        report["elements"] += wanted.numel()
        report["inexact"] += int(wrong.sum())
        if wrong.any():
            error = (rebuilt.double() - wanted.double()).abs().max().item()
            report["max_error"] = max(report["max_error"], error)
        return difference

    write_model_folder(out, config, specs, get_tensor, max_shard_size, side_files(target, base), "making delta")
    return report


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    inputs = {"lora": ("base", "adapter"), "delta": ("base", "delta"), "make-delta": ("base", "target")}
    helps = {"lora": "fold a LoRA adapter into its base model", "delta": "OUT = BASE + DELTA",
             "make-delta": "DELTA = TARGET - BASE, for publishing"}
    for command, (first, second) in inputs.items():
        sub = commands.add_parser(command, help=helps[command])
        sub.add_argument(f"--{first}", required=True, type=Path, help="HF-format model folder")
        sub.add_argument(f"--{second}", required=True, type=Path,
                         help="PEFT adapter folder" if second == "adapter" else "HF-format model folder")
        sub.add_argument("--out", required=True, type=Path,
                         help="output folder: new, or empty (filled under a temporary name, then renamed)")
        sub.add_argument("--overwrite", action="store_true",
                         help="replace OUT even if it is a non-empty folder (it is replaced whole, once the new one is complete)")
        sub.add_argument("--dtype", choices=list(DTYPES), default=None,
                         help="stored dtype of the output (default: " + {
                             "lora": "as the base", "delta": "the dtype in the delta's config.json",
                             "make-delta": "exact: fp64 for fp32 targets, fp32 for bf16/fp16"}[command] + ")")
        sub.add_argument("--max-shard-size", default="5GB", help="largest output file, e.g. 5GB, 500MB (default 5GB)")
        sub.add_argument("--check", action="append", default=[], type=Path, metavar="SUMS",
                         help="verify input files against this SHA256SUMS first (repeatable)")
        if command == "lora":
            sub.add_argument("--into-dequantized", action="store_true",
                             help="QLoRA adapter: fold into the NF4-dequantised base weights it was trained "
                                  "against (default: into the full-precision base)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    inputs = {"lora": (args.base, getattr(args, "adapter", None)), "delta": (args.base, getattr(args, "delta", None)),
              "make-delta": (args.base, getattr(args, "target", None))}[args.command]
    check_output_folder(args.out, args.overwrite)
    for sums in args.check:
        verify_sha256sums(sums, list(inputs))
    dtype = parse_dtype(args.dtype) if args.dtype else None
    if args.command == "lora":
        merge_lora_checkpoint(args.base, args.adapter, args.out, dtype, args.max_shard_size, args.into_dequantized)
    elif args.command == "delta":
        apply_delta(args.base, args.delta, args.out, dtype, args.max_shard_size)
    else:
        report = make_delta(args.base, args.target, args.out, dtype, args.max_shard_size)
        exact = report["elements"] - report["inexact"]
        message = f"round trip (make-delta then delta): {exact:,} of {report['elements']:,} elements exact"
        if report["inexact"]:
            message += (f"; {report['inexact']:,} off by at most {report['max_error']:.3g} "
                        f"(the default --dtype gives an exact delta)")
        print(message)
        print(f"wrote {args.out}")
        return report
    print(f"wrote {args.out}")
    return None


if __name__ == "__main__":
    try:
        main()
    except (MergeError, CheckpointError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
