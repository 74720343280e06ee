"""
OpenAI GPT-2 weights (Radford et al. 2019) for the project's GPT: from_pretrained reads a Hugging Face checkpoint
(model.safetensors, read with torch alone, or pytorch_model.bin) and copies it into model.GPT, downloading the
named sizes once when online. GPT-2 weights need GPT-2's whole vocabulary (--vocab_size=50257).

    model = gpt2.from_pretrained("gpt2", block_size=256)          # or a local file / folder
"""
import json
import os
import urllib.request
from dataclasses import fields

import torch
import torch.nn.functional as F

from common import UserError, atomic_write
from model import GPT, GPTConfig

GPT2_SIZES = {  # OpenAI GPT-2 checkpoints: n_layer, n_head, n_embd (block_size 1024)
    "gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600),
}
GPT2_URL = "https://huggingface.co/openai-community/{}/resolve/main/model.safetensors"



def from_pretrained(name_or_path, cache_dir="~/.cache/rlhf-gpt2", **overrides):
    """OpenAI GPT-2 weights in the Hugging Face layout. name_or_path: "gpt2", "gpt2-medium",
    "gpt2-large", "gpt2-xl" (read from cache_dir, downloaded there when missing), or a local
    model.safetensors / pytorch_model.bin / folder holding one. overrides: GPTConfig fields (e.g. a
    smaller block_size crops the positions; scalar_head=True adds a fresh head); for a local file the
    shape is read from the weights (n_head from a config.json beside it, or the GPT-2 sizes).
    Raises common.UserError (no such file or name, a file that does not fit, a failed download: download
    the file by hand and pass its path), ValueError for an unknown GPTConfig key."""
    bad = set(overrides) - {f.name for f in fields(GPTConfig)}
    if bad:
        raise ValueError(f"from_pretrained: unknown GPTConfig keys {sorted(bad)}")
    path = _gpt2_file(name_or_path, os.path.expanduser(cache_dir))
    sd = read_safetensors(path) if path.endswith(".safetensors") else \
        torch.load(path, map_location="cpu", weights_only=True)
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()
          if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "lm_head.weight"}
    args = dict(n_layer=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("h.")),
                n_embd=sd["wte.weight"].shape[1], block_size=sd["wpe.weight"].shape[0])
    cfg_json = os.path.join(os.path.dirname(path), "config.json")
    sizes = {e: h for _, h, e in GPT2_SIZES.values()}
    if os.path.exists(cfg_json):
        with open(cfg_json) as f:
            args["n_head"] = json.load(f)["n_head"]
    elif args["n_embd"] in sizes:
        args["n_head"] = sizes[args["n_embd"]]
    if "n_head" not in args and "n_head" not in overrides:
        raise UserError(f"{path}: cannot tell n_head (no config.json beside it); pass n_head=...")
    config = GPTConfig(**{**args, **overrides})
    model = GPT(config)
    ours = model.state_dict()
    n = config.block_size
    for k, v in sd.items():
        if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            v = v.t()  # HF Conv1D stores (in, out); nn.Linear wants (out, in)
        if k == "wpe.weight":
            v = v[:n]  # a smaller block_size keeps the first positions
        if k == "wte.weight":
            v = F.pad(v, (0, 0, 0, config.padded_vocab_size - v.shape[0]))  # 50257 -> 50304 rows
        key = "transformer." + k
        if key not in ours or ours[key].shape != v.shape:
            raise UserError(f"{path}: weight {k} {tuple(v.shape)} does not fit this GPT "
                             f"({tuple(ours[key].shape) if key in ours else 'no such weight'}); {config}")
        with torch.no_grad():
            ours[key].copy_(v)
    missing = [k for k in ours if k.removeprefix("transformer.") not in sd
               and k != "lm_head.weight" and not k.startswith("scalar_head.")]  # lm_head: tied to wte
    if missing:
        raise UserError(f"{path}: weights missing: {sorted(missing)[:5]}")
    return model


def _gpt2_file(name_or_path, cache_dir):
    """A GPT-2 name or a local path -> the path of a .safetensors / .bin file (downloading a name)."""
    if os.path.isdir(name_or_path):
        for f in ("model.safetensors", "pytorch_model.bin"):
            if os.path.exists(os.path.join(name_or_path, f)):
                return os.path.join(name_or_path, f)
        raise UserError(f"{name_or_path} holds neither model.safetensors nor pytorch_model.bin")
    if os.path.exists(name_or_path):
        return name_or_path
    if name_or_path not in GPT2_SIZES:
        raise UserError(f"{name_or_path!r} is neither a file nor a folder nor one of {list(GPT2_SIZES)}")
    path = os.path.join(cache_dir, name_or_path, "model.safetensors")
    if not os.path.exists(path):
        url = GPT2_URL.format(name_or_path)
        print(f"downloading {url} -> {path}")
        try:
            with atomic_write(path) as tmp:
                urllib.request.urlretrieve(url, tmp)
        except Exception as e:
            raise UserError(f"could not download {url} ({e}). Download the file by hand and pass its path: "
                            "--init_from=/path/to/model.safetensors") from None
    return path


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_safetensors(path):
    """Read a .safetensors file with torch alone -> dict name -> CPU tensor. Format: a little-endian
    u64 header length n, n bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}} (offsets
    relative to the end of the header), then the raw little-endian tensor bytes."""
    with open(path, "rb") as f:
        buf = bytearray(f.read())
    n = int.from_bytes(buf[:8], "little")
    header = json.loads(buf[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, (b, e) = _ST_DTYPES[info["dtype"]], info["data_offsets"]
        count = (e - b) // torch.empty(0, dtype=dtype).element_size()
        t = torch.frombuffer(buf, dtype=dtype, count=count, offset=8 + n + b) if count else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(info["shape"])
    return out
