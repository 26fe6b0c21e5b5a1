"""The docs cannot rot: in README.md and every docs/*.md page, every command in a ```bash block (and every
`python ...` / `torchrun ...` quoted in the text) is checked against the code, every link points to a
file (and an anchor to a heading of it), every `file.py:name` is defined there, the ```python snippets
run, and the loader messages quoted are the ones the loader prints.

- `python X.py ...` (also after `torchrun ... X.py`): the script's own parse_args runs on the command's
  flags, with argparse's prefix matching turned off (so a renamed flag fails here) and paths the command
  names (--data_path, --finetune, ...) replaced by small stand-ins. Training does not start.
- `torchrun ...`: torchrun's own argument parser checks the launcher's part.
- `pip install -r requirements.txt`: the file lists every third-party module the code imports at module level.
- `ffmpeg ...`: run for real on a built-in video when an ffmpeg binary is available.
- ```python blocks run with every size of the size table shrunk to a micro model (shapes that depend only
  on the token grid are unchanged), in a folder where the checkpoint files they name exist.
"""
import argparse
import ast
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from itertools import takewhile
from pathlib import Path

import pytest
import torch

import checkpoints
import vmae
from conftest import export_videos
from test_train_pretrain import MICRO

ROOT = Path(__file__).resolve().parent.parent
PAGES = {p.relative_to(ROOT).as_posix(): p.read_text() for p in [ROOT / "README.md", *sorted(ROOT.glob("docs/*.md"))]}
SCRIPTS = {"train_pretrain.py", "train_finetune.py", "visualize.py", "bench.py", "gpu_suite.py", "study.py",
           "extract_features.py", "export_hf.py"}
# flags whose value is a file or folder that parse_args may check or read
PATH_FLAGS = {"--data_path", "--finetune", "--resume", "--checkpoint", "--checkpoints", "--label_map", "--video",
              "--frames"}
SHELL_VARIABLES = {"NODE_RANK": "0", "HOST": "localhost", "MASTER_HOST": "localhost"}


def fenced(language: str, text: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def bash_commands(text: str) -> list[str]:
    """Every command of every ```bash block: continuation lines joined, comments dropped, split at &&."""
    commands = []
    for block in fenced("bash", text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands += [c.strip() for c in line.split("&&")]
    return commands


def inline_commands(text: str) -> list[str]:
    """Commands quoted in running text and tables, e.g. `python bench.py --flops`."""
    return re.findall(r"`((?:python|torchrun) [^`]+)`", text)


COMMANDS = {}  # each command once, with the first page that runs it
for page, text in PAGES.items():
    for command in bash_commands(text) + inline_commands(text):
        COMMANDS.setdefault(command, page)
SNIPPETS = [(page, snippet) for page, text in PAGES.items() for snippet in fenced("python", text)]
CODE_REFERENCE = r"`(\w+\.py):(\w+)`"


def test_the_pages_have_commands_and_snippets():
    """What the checks below read is found: a changed fence or quoting style must not leave them nothing."""
    readme = PAGES["README.md"]
    assert len(bash_commands(readme)) >= 4 and len(inline_commands(readme)) >= 4 and fenced("python", readme)
    assert len(re.findall(CODE_REFERENCE + r"\]\(", readme)) >= 15, "the README's reading path was not found"
    assert len(COMMANDS) >= 50 and len(SNIPPETS) >= 3 and "docs/training.md" in PAGES


# -----------------------------------------------------------------------------------------------------
# Shell commands


@pytest.fixture
def strict_argparse(monkeypatch):
    """No prefix matching: `--with_checkpoint` must not pass as an abbreviation of a longer, renamed flag."""
    init = argparse.ArgumentParser.__init__

    def no_abbrev(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        init(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "__init__", no_abbrev)


def stand_in(flag: str, value: str, tmp_path: Path, model: str) -> str:
    """An existing path of the right kind for a path flag of a documented command."""
    path = tmp_path / "stand_in" / flag.strip("-") / value.strip("/").replace("/", "_")
    path.parent.mkdir(parents=True, exist_ok=True)
    if flag in ("--data_path", "--frames") and (value.endswith("/") or "." not in Path(value).name):
        path.mkdir(exist_ok=True)
    elif flag in ("--finetune", "--resume", "--checkpoint", "--checkpoints"):
        # parse_args reads the checkpoint for the size it states (the command's --model, or base) and may
        # check that it has a decoder
        decoder = {"mask_token": torch.zeros(1, 1, 1), "decoder.head.bias": torch.zeros(1)}
        torch.save({"model": decoder, "args": {"model": model}}, path)
    elif flag == "--label_map":
        path.write_text(json.dumps(list(range(400))))
    else:
        path.write_text("clip.mp4 0 -1\n")
    return str(path)


def substitute(argv: list[str], tmp_path: Path) -> list[str]:
    out = list(argv)
    model = out[out.index("--model") + 1] if "--model" in out[:-1] else "base"
    for i, token in enumerate(out[:-1]):
        if token in PATH_FLAGS:
            values = (len(list(takewhile(lambda t: not t.startswith("-"), out[i + 1:])))
                      if token == "--checkpoints" else 1)
            out[i + 1:i + 1 + values] = [stand_in(token, v, tmp_path, model) for v in out[i + 1:i + 1 + values]]
    return out


def expand_variables(command: str) -> str:
    def value(match):
        assert match.group(1) in SHELL_VARIABLES, f"the docs use ${match.group(1)}: give it a value in SHELL_VARIABLES"
        return SHELL_VARIABLES[match.group(1)]
    return re.sub(r"\$(\w+)", value, command)


def check_script(script: str, argv: list[str], tmp_path: Path, monkeypatch) -> argparse.Namespace:
    assert script in SCRIPTS, f"the docs run {script}, which this test does not know"
    module = __import__(script.removesuffix(".py"))
    if "--fsdp" in argv:
        monkeypatch.setenv("WORLD_SIZE", "8")  # what torchrun sets; --fsdp demands it
    argv = substitute(argv, tmp_path)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return module.parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{script} rejects {' '.join(argv)}:\n"
                    f"{stderr.getvalue()}{e.code if isinstance(e.code, str) else ''}")


def requirement_names() -> set[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return {re.split(r"[<>=!~ \[;#]", line.strip())[0].lower()
            for line in lines if line.strip() and not line.startswith("#")}


def module_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def check_requirements() -> None:
    local = {p.stem for p in ROOT.glob("*.py")} | {p.stem for p in (ROOT / "tests").glob("*.py")}
    imported = set()
    for path in [*ROOT.glob("*.py"), *(ROOT / "tests").glob("*.py")]:
        imported |= module_level_imports(path)
    third_party = imported - local - set(sys.stdlib_module_names)
    distribution = {"cv2": "opencv-python"}
    missing = {m for m in third_party if distribution.get(m, m).lower() not in requirement_names()}
    assert not missing, f"requirements.txt does not list {sorted(missing)}"


def ffmpeg_binary() -> str | None:
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg
        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:
        return None


def check_ffmpeg(argv: list[str], tmp_path: Path) -> None:
    """Run it on a built-in video (wider than tall) and check the result's short side and length."""
    import cv2
    import data
    binary = ffmpeg_binary()
    if binary is None:
        pytest.skip("no ffmpeg binary here (install ffmpeg or imageio-ffmpeg to check this command)")
    listed = Path(export_videos(data.SyntheticVideos(2, length=12, height=48, width=64), str(tmp_path), "train"))
    video = listed.read_text().split()[0]
    video = video if os.path.isabs(video) else str(listed.parent / video)
    output = tmp_path / "resized.mp4"
    argv = [binary, "-loglevel", "error", "-y"] + [video if a == "input.mp4" else str(output) if a == "resized.mp4"
                                                   else a for a in argv[1:]]
    assert video in argv and str(output) in argv, "the ffmpeg command no longer names input.mp4 and resized.mp4"
    subprocess.run(argv, check=True, timeout=60)
    cap = cv2.VideoCapture(str(output))
    size = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    assert min(size) == 320 and size[0] > size[1], f"resized to {size}"
    assert len(data.read_video(str(output), lambda n: range(n))) == 12


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{page}: {c[:70]}" for c, page in COMMANDS.items()])
def test_command(command, tmp_path, monkeypatch, strict_argparse):
    argv = shlex.split(expand_variables(command), comments=True)
    if argv[:3] == ["pip", "install", "-r"]:
        assert argv[3:] == ["requirements.txt"]
        check_requirements()
    elif argv[:3] == ["python", "-m", "pytest"]:
        assert "pytest" in requirement_names() and (ROOT / "pytest.ini").is_file() and (ROOT / "tests").is_dir()
        assert all((ROOT / a).is_file() for a in argv[3:] if a.endswith(".py")), f"{command}: no such test file"
    elif argv[0] == "python":
        check_script(argv[1], argv[2:], tmp_path, monkeypatch)
    elif argv[0] == "torchrun":
        from torch.distributed.run import get_args_parser
        launcher = get_args_parser().parse_args(argv[1:])
        check_script(launcher.training_script, launcher.training_script_args, tmp_path, monkeypatch)
    elif argv[0] == "ffmpeg":
        check_ffmpeg(argv, tmp_path)
    else:
        pytest.fail(f"{COMMANDS[command]}: command {command!r}: this test does not know how to check it; add a case")


def test_a_renamed_flag_fails(tmp_path, monkeypatch, strict_argparse):
    """The check above can fail: an unknown flag, or a prefix of a real one, is rejected."""
    for argv in (["--with_checkpointing"], ["--with_check"], ["--data_path"]):
        with pytest.raises(BaseException):
            check_script("train_pretrain.py", argv, tmp_path, monkeypatch)


# -----------------------------------------------------------------------------------------------------
# Links and the reading path


def headings(text: str) -> set[str]:
    """GitHub's anchors for a page's headings (lines in fenced blocks are not headings)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES)
def test_links_point_to_files_and_headings(page):
    text, here = PAGES[page], (ROOT / page).parent
    targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'src="([^"]+)"', text)
    assert targets, f"no links found in {page}"
    for target in targets:
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        file = (here / path).resolve() if path else ROOT / page
        assert file.exists(), f"{page} links to {target}, which does not exist"
        if anchor:
            assert file.suffix == ".md" and anchor in headings(file.read_text()), \
                f"{page} links to {target}, which is no heading of {file.name}"


@pytest.mark.parametrize("page", PAGES)
def test_code_references_are_defined(page):
    """Every `file.py:name` (the reading path's and any other) is defined in that file, and links to it."""
    text, here = PAGES[page], (ROOT / page).parent
    for file, name, link in re.findall(CODE_REFERENCE + r"\]\(([^)\s]+)\)", text):
        assert (here / link).resolve() == ROOT / file, f"{page}: [{file}:{name}] links to {link}"
    for file, name in re.findall(CODE_REFERENCE, text):
        source = (ROOT / file).read_text()
        assert re.search(rf"^\s*(def|class) {name}\b", source, flags=re.M), f"{page}: {file} defines no {name}"


# -----------------------------------------------------------------------------------------------------
# Python snippets and the loader's messages


@pytest.fixture
def tiny_sizes(monkeypatch):
    """Every size of the table at micro width and depth; giant keeps its 14-pixel patches and MLP ratio."""
    for size, spec in list(vmae.SIZES.items()):
        keep = {k: v for k, v in spec.items() if k in ("patch_size", "mlp_ratio")}
        monkeypatch.setitem(vmae.SIZES, size, {**MICRO, **keep})


def hugging_face_pretraining_weights(cfg: vmae.VideoMAEConfig) -> dict:
    transformers = pytest.importorskip("transformers")
    hf = transformers.VideoMAEConfig(
        image_size=cfg.img_size, patch_size=cfg.patch_size, num_frames=cfg.num_frames, tubelet_size=cfg.tubelet_size,
        hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
        intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio), decoder_hidden_size=cfg.decoder_embed_dim,
        decoder_num_hidden_layers=cfg.decoder_depth, decoder_num_attention_heads=cfg.decoder_num_heads,
        decoder_intermediate_size=int(cfg.decoder_embed_dim * cfg.mlp_ratio), use_mean_pooling=False)
    return transformers.VideoMAEForPreTraining(hf).state_dict()


# The files the docs' snippets name, and how to make a stand-in of each (under tiny_sizes).
FILES = {
    "output/pretrain/checkpoint-last.pth": lambda: {
        "model": vmae.PretrainVideoMAE(vmae.config("small", img_size=96, num_frames=8)).state_dict(),
        "args": dict(model="small", input_size=96, num_frames=8, tubelet_size=2, decoder_depth=4)},
    "vit_g_hybrid_pt_1200e.pth": lambda: {  # a compiled run of the reference
        "model": {f"_orig_mod.{k}": v for k, v in vmae.PretrainVideoMAE(vmae.config("giant")).state_dict().items()}},
    "vit_g_hybrid_pt_1200e_k710_ft.pth": lambda: {
        "module": vmae.VideoClassifier(vmae.config("giant"), 710).state_dict()},
    "label_710to400.json": lambda: list(range(400)),
    "videomae-base/pytorch_model.bin": lambda: hugging_face_pretraining_weights(vmae.config("base")),
}


@pytest.mark.parametrize("index", range(len(SNIPPETS)), ids=[f"{page}: {i}" for i, (page, _) in enumerate(SNIPPETS)])
def test_python_snippet_runs(index, tiny_sizes, tmp_path, monkeypatch, capsys):
    page, snippet = SNIPPETS[index]
    monkeypatch.chdir(tmp_path)
    for name in set(re.findall(r'"([^"]+\.(?:pth|bin|safetensors|json))"', snippet)):
        assert name in FILES, f"a snippet of {page} loads {name}: add a stand-in for it to FILES"
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        content = FILES[name]()
        if name.endswith(".json"):
            Path(name).write_text(json.dumps(content))
        else:
            torch.save(content, name)
    namespace = {}
    exec(compile(snippet, f"{page}, python block {index}", "exec"), namespace)
    if "pred" in namespace:  # the method snippet: its shape comment and a finite loss
        assert tuple(namespace["pred"].shape) == (2, 784, 1536)
        assert torch.isfinite(namespace["loss"])
    assert "WARNING" not in capsys.readouterr().out


def loader_output(tmp_path: Path) -> list[str]:
    """What the loader says in every situation the docs explain: its report lines and its errors."""
    cfg = vmae.config("small", **MICRO, img_size=32, num_frames=4)
    pretrain, classifier = vmae.PretrainVideoMAE(cfg).state_dict(), vmae.VideoClassifier(cfg, 710).state_dict()
    files = {"pretrain.pth": {"model": pretrain}, "classifier.pth": {"model": classifier},
             "no_fc_norm.pth": {k: v for k, v in classifier.items() if not k.startswith("fc_norm.")},
             "extra.pth": {**classifier, "cls_token": torch.zeros(1, 1, 32)},
             "renamed.pth": {k.replace("blocks.", "layers."): v for k, v in classifier.items()},
             "small.pth": vmae.PretrainVideoMAE(vmae.config("small", img_size=32, num_frames=4)).state_dict()}
    for name, content in files.items():
        torch.save(content, tmp_path / name)
    lines = []

    def say(what):
        try:
            lines.extend(str(what()).splitlines())
        except checkpoints.CheckpointError as e:
            lines.extend(str(e).splitlines())
    say(lambda: checkpoints.load_weights(vmae.VideoClassifier(cfg, 400), tmp_path / "pretrain.pth"))  # left out, fresh
    say(lambda: checkpoints.load_weights(vmae.VideoClassifier(cfg, 0), tmp_path / "classifier.pth"))  # no head here
    say(lambda: checkpoints.load_weights(vmae.VideoClassifier(cfg, 400), tmp_path / "classifier.pth"))  # dropping head
    # head without fc_norm
    say(lambda: checkpoints.load_weights(vmae.VideoClassifier(cfg, 710), tmp_path / "no_fc_norm.pth"))
    say(lambda: checkpoints.load_weights(vmae.VideoClassifier(cfg, 710), tmp_path / "extra.pth"))  # fits nothing
    # random init: stops
    say(lambda: checkpoints.load_weights(vmae.VideoClassifier(cfg, 710), tmp_path / "renamed.pth"))
    say(lambda: checkpoints.load_weights(vmae.PretrainVideoMAE(cfg), tmp_path / "classifier.pth"))  # no decoder
    say(lambda: checkpoints.load_weights(vmae.PretrainVideoMAE(cfg), tmp_path / "small.pth"))  # another size
    # --model
    say(lambda: checkpoints.config_from_checkpoint(checkpoints.read_checkpoint(tmp_path / "pretrain.pth"), "base"))
    say(lambda: checkpoints.config_from_checkpoint(checkpoints.read_checkpoint(tmp_path / "pretrain.pth")))  # no size
    return [line.strip() for line in lines]


def test_quoted_loader_messages_are_what_it_prints(tmp_path):
    blocks = [b for text in PAGES.values() for b in fenced("text", text) if "(read as <layout>)" in b]
    assert len(blocks) == 2, "the docs' blocks of loader messages (reports, stops) were not found"
    printed = loader_output(tmp_path)
    for line in "".join(blocks).strip().splitlines():
        pattern = ".+?".join(re.escape(part) for part in re.split(r"<[^>]+>", line.strip()))
        assert any(re.fullmatch(pattern, p) for p in printed), \
            f"the docs quote a loader message that load_weights does not print:\n  {line}\nit prints:\n  " \
            + "\n  ".join(printed)
