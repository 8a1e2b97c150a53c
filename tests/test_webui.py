"""The studio page through gradio_client: every named endpoint, a pocket job's whole life (launch →
progress rows → sample image → stop → resume → finished LoRA, downloaded in both formats), the step
inspector, the pool explorer, the LoRA tools, and what the page refuses to serve."""

import os
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
import test_jobs
import torch
import yaml
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from test_jobs import POCKET_PROMPTS, tiny_values, wait_for

ROOT = Path(__file__).resolve().parents[1]
AUTH = ("spo", "s3cret-pass")
ENDPOINTS = {
    "/select_method", "/load_preset", "/check_upload", "/build_config", "/submit_job",
    "/refresh_jobs", "/select_job", "/stop_job", "/resume_job", "/delete_job",
    "/inspect_steps", "/explore_pool", "/lora_info", "/lora_convert", "/lora_merge",
    "/list_loras_inspector", "/list_loras_pool", "/list_loras_tools",
}
CALLED: set[str] = set()

job_spm, pocket_prompts = test_jobs.job_spm, test_jobs.pocket_prompts  # shared fixtures


def call(client: Client, api_name: str, *args, **kwargs):
    CALLED.add(api_name)
    return client.predict(*args, api_name=api_name, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The page, launched in-process with a login, on a fresh runs folder; jobs run one thread each."""
    from spo_studio.webui.app import Studio, build_app, launch

    with pytest.MonkeyPatch.context() as mp:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            mp.setenv(var, "1")
        mp.setenv("TQDM_DISABLE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        runs = tmp_path_factory.mktemp("page") / "runs"
        studio = Studio(runs_dir=runs, devices=["cpu"], inspector_device="cpu", refresh_seconds=1.0)
        demo = build_app(studio)
        _, url, _ = launch(demo, studio, port=free_port(), auth=[AUTH], max_upload_mb=1, prevent_thread_lock=True,
                           quiet=True)
        client = Client(url, auth=AUTH, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))
        yield {"client": client, "studio": studio, "url": url, "runs": studio.runs_dir}
        demo.close()


@pytest.fixture(scope="module")
def pocket_lora(tmp_path_factory):
    """A small random LoRA for the pocket UNet, in webui format."""
    from spo_studio.backend import lora as lora_io
    from spo_studio.backend.models import load_model

    model = load_model("pocket", device="cpu", dtype="fp32")
    lora_io.attach_lora(model.unet, family=model.family, rank=2, alpha=2.0, target_modules=["to_q", "to_v"])
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    path = tmp_path_factory.mktemp("lora") / "pocket_test_lora.safetensors"
    lora_io.save_lora(lora_io.extract_lora(model.unet, family=model.family), path, format="webui")
    return path


def _rows(plot: dict | None) -> list:
    return (plot or {}).get("data") or []


def test_every_event_has_a_named_endpoint(page):
    api = page["client"].view_api(return_format="dict", print_info=False)
    assert set(api["named_endpoints"]) == ENDPOINTS
    assert not api["unnamed_endpoints"]


def test_form_is_generated_from_the_config_dataclasses(page):
    client = page["client"]
    call(client, "/select_method", "dpo")  # shows the DPO form (layout only: nothing comes back to a client)
    dpo = yaml.safe_load(call(client, "/build_config", "dpo"))
    assert dpo["method"] == "dpo" and dpo["beta"] == 5000.0 and dpo["train_data"] == "pocket"
    text = call(client, "/build_config", "spo")  # the page's defaults: the pocket preset
    cfg = yaml.safe_load(text)
    assert cfg["method"] == "spo" and cfg["base_model"] == "pocket" and cfg["spm"] == "pocket"
    assert cfg["pool_size"] == 4 and cfg["threshold"] == 0.3 and cfg["beta"] == 10.0  # paper defaults
    assert "output_dir" not in cfg and "resume" not in cfg  # the job store sets those
    presets = sorted(p.name for p in (ROOT / "configs").glob("pocket_*.yaml"))
    if "pocket_dpo.yaml" in presets:
        updates = call(client, "/load_preset", "pocket_dpo.yaml")
        assert updates[0]["value"] == "dpo"
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/load_preset"]
    choices = api["parameters"][0]["type"]["enum"]
    assert "pocket_spo.yaml" in choices and "pocket_spm.yaml" not in choices  # training presets only
    with pytest.raises(AppError, match="not in the list of choices"):
        call(client, "/load_preset", "../../etc/passwd")


def test_uploads_are_validated_with_a_clear_error(page, tmp_path):
    good = tmp_path / "my_prompts.txt"
    good.write_text("\n".join(POCKET_PROMPTS))
    answer = call(page["client"], "/check_upload", "spo", handle_file(str(good)))
    assert answer.startswith("✓ my_prompts.txt: 2 prompts")
    bad = tmp_path / "broken.json"
    bad.write_text("[1, 2")
    with pytest.raises(AppError, match="broken.json: not valid JSON"):
        call(page["client"], "/check_upload", "spo", handle_file(str(bad)))
    with pytest.raises(AppError, match="my_prompts.txt: preference data must be a Pick-a-Pic .parquet"):
        call(page["client"], "/check_upload", "dpo", handle_file(str(good)))
    huge = tmp_path / "huge.txt"
    huge.write_text("a red circle on a blue background\n" * 40_000)  # 1.3 MB: over this page's 1 MB limit
    with pytest.raises(Exception, match="(?i)file size|too large|413"):
        call(page["client"], "/check_upload", "spo", handle_file(str(huge)))


def test_job_lifecycle_through_the_page(page, job_spm, pocket_prompts):
    client, runs = page["client"], page["runs"]
    config = "method: spo\n" + yaml.safe_dump(tiny_values(job_spm, pocket_prompts, epochs=6))
    with pytest.raises(AppError, match="unknown key"):
        call(client, "/submit_job", config + "pool_sise: 3\n", "typo", 1, None)
    message, select = call(client, "/submit_job", config, "pocket lifecycle", 1, None)
    assert "Job **#1**" in message and select["value"] == 1

    def state():  # /select_job answers with everything; /refresh_jobs (the page's timer) with what changed
        out = call(client, "/select_job", 1)
        return {"table": out[0], "status": out[2], "loss": _rows(out[3]), "yield": _rows(out[5]),
                "samples": out[7], "webui": out[8], "diffusers": out[9], "log": out[10]}

    seen = wait_for(lambda: (s := state())["samples"] and s["loss"] and s, what="progress rows and a sample image")
    assert "running" in seen["status"] and Path(seen["samples"][0]["image"]).is_file()
    assert all(r[2] == "loss" for r in seen["loss"]) and seen["yield"]
    assert seen["table"]["data"][0][:4] == [1, "pocket lifecycle", "spo", "running"]

    assert "stopping" in call(client, "/stop_job", 1)
    stopped = wait_for(lambda: "stopped" in (s := state())["status"] and s, timeout=30, what="the job to stop")
    steps_at_stop = max(r[0] for r in stopped["loss"])
    assert (runs / "0001-spo-pocket-lifecycle" / "checkpoints").is_dir()  # the final checkpoint
    assert call(client, "/refresh_jobs", 1)[2] == {"__type__": "update"}  # the timer sends only what changed

    assert call(client, "/resume_job", 1).startswith("Job #1:")
    done = wait_for(lambda: "finished" in (s := state())["status"] and s, timeout=90, what="the resumed job to finish")
    assert max(r[0] for r in done["loss"]) > steps_at_stop  # it went on from where it stopped
    events = (runs / "0001-spo-pocket-lifecycle" / "events.jsonl").read_text()
    assert '"resumed"' in events and '"stopped"' in events and '"finished"' in events
    epochs = [int(im["caption"].split()[1]) for im in done["samples"]]
    # one per epoch; a stop that lands on an epoch's very last step skips that epoch's image (the trainer
    # counts the round as done in its final checkpoint and writes samples after the round)
    assert epochs == sorted(set(epochs)) and epochs[-1] == 6 and len(epochs) >= 5
    for fmt in ("webui", "diffusers"):
        downloaded = Path(done[fmt]["value"])
        original = runs / "0001-spo-pocket-lifecycle" / "lora" / f"spo_lora_{fmt}.safetensors"
        assert downloaded.read_bytes() == original.read_bytes()

    with pytest.raises(AppError, match="only stopped or failed jobs can be resumed"):
        call(client, "/resume_job", 1)
    assert "deleted" in call(client, "/delete_job", 1)
    assert not (runs / "0001-spo-pocket-lifecycle").exists()
    assert all(row[0] != 1 for row in call(client, "/select_job", None)[0]["data"])


def test_a_new_client_reaches_jobs_created_after_the_page_started(page):
    store = page["studio"].store
    job = store.submit("spo", {}, name="made later", start=False)  # after the page built its job list
    fresh = Client(page["url"], auth=AUTH, verbose=False)  # a script's own session
    assert "made later" in call(fresh, "/select_job", job.id)[2]
    with pytest.raises(AppError, match="only stopped or failed jobs can be resumed"):
        call(fresh, "/resume_job", job.id)  # reached the store: the id was taken
    assert "cancelled before it started" in call(fresh, "/stop_job", job.id)
    assert call(fresh, "/delete_job", job.id) == f"Job #{job.id} deleted."
    for name in ("/select_job", "/stop_job", "/resume_job", "/delete_job"):
        with pytest.raises(AppError, match=f"no job {job.id}: it does not exist"):
            call(fresh, name, job.id)


@pytest.fixture
def busy_slot(page):
    """The page's only CPU slot held by a stand-in running job, so what the page queues waits (and trains nothing)."""
    from spo_studio.backend import jobs

    store = page["studio"].store
    holder = store.submit("spo", {}, name="slot holder", start=False)
    store._update(holder.id, status="running", devices="cpu", pid=os.getpid(),
                  pid_started=jobs._process_started(os.getpid()))
    yield store
    for job in store.list(reconcile=False):
        if job.status == "queued":
            store.stop(job.id)
    store._update(holder.id, status="failed")
    for job in store.list(reconcile=False):
        store.delete(job.id)


def test_names_are_bounded_and_shown_as_plain_text(page, busy_slot):
    client = page["client"]
    with pytest.raises(AppError, match="name: at most 100 characters; got 5000"):
        call(client, "/submit_job", "method: spo\n", "x" * 5000, 1, None)
    with pytest.raises(AppError, match="name: control character"):
        call(client, "/submit_job", "method: spo\n", "a\x00b", 1, None)
    name = "<img src=x onerror=alert(1)> **loud** [link](http://example.com)"
    message, select = call(client, "/submit_job", "method: spo\n", name, 1, None)
    status = call(client, "/select_job", select["value"])[2]
    for shown in (message, status):
        assert "<img" not in shown and "**loud**" not in shown and "[link](" not in shown
        assert "&lt;img src=x onerror=alert\\(1\\)&gt; \\*\\*loud\\*\\* \\[link\\]" in shown
    assert busy_slot.get(select["value"]).name == name  # kept as typed


def test_config_refusals_reach_the_page(page):
    for text, says in (("config_version: 99\n", "config_version 99 is newer"),
                       ("lora_targets: []\n", "lora_targets must name at least one UNet module"),
                       ("lr: .nan\n", "lr must be a finite number; got nan"),
                       ("lora_targets: [no_such_module]\n", "'no_such_module' names no Linear or Conv layer")):
        with pytest.raises(AppError, match=re.escape(says)):
            call(page["client"], "/submit_job", "method: spo\n" + text, "bad", 1, None)


def _in_upload_folder(name: str) -> list[Path]:
    from spo_studio.webui.safety import upload_folder

    return list(upload_folder().rglob(name))


def test_uploads_leave_the_temp_folder_and_messages_name_no_server_path(page, busy_slot, tmp_path):
    from spo_studio.webui.safety import upload_folder

    client, tag = page["client"], uuid.uuid4().hex[:8]
    bad = tmp_path / f"broken-{tag}.json"
    bad.write_text("[1, 2")
    with pytest.raises(AppError) as refused:
        call(client, "/check_upload", "spo", handle_file(str(bad)))
    said = str(refused.value)
    assert f"broken-{tag}.json: not valid JSON" in said and str(upload_folder()) not in said
    assert _in_upload_folder(bad.name) == []  # a rejected upload is removed at once

    garbage = tmp_path / f"garbage-{tag}.safetensors"
    garbage.write_bytes(b"these bytes are not a safetensors file")
    with pytest.raises(AppError) as refused:
        call(client, "/lora_info", handle_file(str(garbage)), None)
    assert garbage.name in str(refused.value) and str(upload_folder()) not in str(refused.value)
    assert _in_upload_folder(garbage.name) == []

    good = tmp_path / f"used-{tag}.txt"
    good.write_text("\n".join(POCKET_PROMPTS))
    message, select = call(client, "/submit_job", "method: spo\n", "with upload", 1, handle_file(str(good)))
    run = Path(busy_slot.get(select["value"]).run_dir)
    assert (run / "prompts.txt").read_text() == good.read_text()  # the run folder holds its copy
    assert _in_upload_folder(good.name) == []  # so the upload is gone


def test_the_temp_folder_is_swept_by_age(tmp_path):
    from spo_studio.webui.app import Studio, build_app, launch

    studio = Studio(runs_dir=tmp_path / "runs", devices=["cpu"], inspector_device="cpu", temp_max_age_s=1)
    demo = build_app(studio)
    _, url, _ = launch(demo, studio, port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        kept = tmp_path / f"kept-{uuid.uuid4().hex[:8]}.txt"
        kept.write_text("\n".join(POCKET_PROMPTS))
        assert call(Client(url, verbose=False), "/check_upload", "spo", handle_file(str(kept))).startswith("✓")
        assert _in_upload_folder(kept.name)  # a valid upload stays for the Launch that uses it ...
        wait_for(lambda: not _in_upload_folder(kept.name), timeout=20, what="the sweep to remove it")  # ... a while
    finally:
        demo.close()


def test_step_inspector_and_pool_explorer(page, job_spm, pocket_lora):
    client = page["client"]
    plot, summary, gallery = call(client, "/inspect_steps", "pocket", job_spm, [str(pocket_lora)], 1.0,
                                  POCKET_PROMPTS[0], 0, 4, 5.0, 1.0)
    series = {row[3] for row in plot["data"]}
    assert series == {"base", pocket_lora.stem}
    assert len(plot["data"]) == 2 * 4 and len(gallery) == 2 * (4 + 1)
    assert "| base |" in summary and gallery[-1]["caption"].endswith("final image")

    summary, gallery = call(client, "/explore_pool", "pocket", job_spm, str(pocket_lora), 1.0, POCKET_PROMPTS[0], 0,
                            4, 5.0, 1.0, 1, 3, 0.0)
    assert len(gallery) == 1 + 3
    captions = [g["caption"] for g in gallery[1:]]
    assert sum("★ winner" in c for c in captions) == 1 and sum("✗ loser" in c for c in captions) == 1
    assert "the pair is **kept**" in summary  # threshold 0 keeps every pair
    with pytest.raises(AppError, match=r"step must lie in \[0, 3\]"):
        call(client, "/explore_pool", "pocket", job_spm, None, 1.0, POCKET_PROMPTS[0], 0, 4, 5.0, 1.0, 7, 3, 0.3)
    with pytest.raises(AppError, match="no such LoRA file"):
        call(client, "/inspect_steps", "pocket", job_spm, ["/nowhere/x.safetensors"], 1.0, "a red circle", 0, 4,
             5.0, 1.0)


def test_inspector_and_pool_explorer_with_the_latent_spm(page):
    """`pocket-latent`: every step's x_t and each pool candidate are scored by the latent SPM itself."""
    client = page["client"]
    plot, summary, gallery = call(client, "/inspect_steps", "pocket", "pocket-latent", [], 1.0, POCKET_PROMPTS[0],
                                  0, 4, 5.0, 1.0)
    assert len(plot["data"]) == 4 and len({row[2] for row in plot["data"]}) > 1
    summary, gallery = call(client, "/explore_pool", "pocket", "pocket-latent", None, 1.0, POCKET_PROMPTS[0], 0,
                            4, 5.0, 1.0, 1, 3, 0.0)
    assert len(gallery) == 1 + 3 and "the pair is **kept**" in summary


def test_lora_tools(page, pocket_lora):
    client, runs = page["client"], page["runs"]
    info = call(client, "/lora_info", handle_file(str(pocket_lora)), None)
    assert info["format"] == "webui" and info["family"] == "sd15" and info["rank"] == 2
    message, converted = call(client, "/lora_convert", handle_file(str(pocket_lora)), None, "diffusers")
    assert "diffusers format" in message
    written = next((runs / "lora_tools").glob("*_to_diffusers.safetensors"))
    umask = os.umask(0o022)
    os.umask(umask)
    assert written.stat().st_mode & 0o777 == 0o666 & ~umask  # as every other file, not 0600
    assert Path(converted).read_bytes() == written.read_bytes()
    assert call(client, "/lora_info", None, str(written))["format"] == "diffusers"  # picked from the runs folder
    message, merged = call(client, "/lora_merge", None, str(written), "pocket", 0.5)
    assert "strength 0.5" in message and Path(merged).stat().st_size > 1_000_000
    for outside in ("/etc/passwd", str(runs / ".." / "elsewhere.safetensors")):
        with pytest.raises(AppError, match="outside the runs folder"):
            call(client, "/lora_info", None, outside)
    with pytest.raises(AppError, match="upload a LoRA or pick one"):
        call(client, "/lora_convert", None, None, "webui")
    for name in ("/list_loras_inspector", "/list_loras_pool", "/list_loras_tools"):
        assert isinstance(call(client, name), (list, tuple, dict))


def test_lora_tools_family_field(page, tmp_path):
    """A LoRA that says nothing of its family (no metadata, no telling layers) converts once the family is given."""
    from safetensors.torch import save_file

    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"  # a pocket UNet layer
    silent = tmp_path / f"silent-{uuid.uuid4().hex[:8]}.safetensors"
    save_file({f"{key}.lora_down.weight": torch.randn(2, 64), f"{key}.lora_up.weight": torch.zeros(64, 2)},
              str(silent))
    with pytest.raises(AppError, match="cannot tell whether this LoRA is for SD1.5 or SDXL; pass the family"):
        call(page["client"], "/lora_convert", handle_file(str(silent)), None, "webui", "from the file")
    message, _ = call(page["client"], "/lora_convert", handle_file(str(silent)), None, "webui", "sd15")
    assert "webui format" in message


def test_only_files_under_the_runs_folder_are_served(page, tmp_path):
    runs, url = page["runs"], page["url"].rstrip("/")
    inside = runs / "0099-spo-x" / "samples" / "epoch-001.png"
    inside.parent.mkdir(parents=True)
    inside.write_bytes(b"\x89PNG fake")
    secret = runs.parent / "secret.txt"
    secret.write_text("not for the web")
    with httpx.Client() as http:
        assert http.get(f"{url}/gradio_api/file={inside}").status_code in (401, 403)  # not logged in
        assert http.post(f"{url}/login", data={"username": AUTH[0], "password": "wrong"}).status_code == 400
        assert http.post(f"{url}/login", data={"username": AUTH[0], "password": AUTH[1]}).status_code == 200
        assert http.get(f"{url}/gradio_api/file={inside}").content == b"\x89PNG fake"
        for path in (secret, f"{runs}/../secret.txt", "/etc/passwd", runs / "jobs.db", f"{runs}/jobs.db-wal"):
            assert http.get(f"{url}/gradio_api/file={path}").status_code == 403, path
        # the server itself refuses an upload over the limit, whatever the client does
        big = http.post(f"{url}/gradio_api/upload", files={"files": ("big.txt", b"x" * (2 * 2**20))})
        assert big.status_code == 413


def test_bind_and_auth_rules():
    from spo_studio.webui.safety import UnsafeSetup, bind_address, parse_auth, served_file

    assert bind_address(False, [], False) == "127.0.0.1"
    with pytest.raises(UnsafeSetup, match="add --auth"):
        bind_address(True, [], False)
    assert bind_address(True, [("a", "b")], False) == "0.0.0.0"
    assert bind_address(True, [], True) == "0.0.0.0"
    with pytest.raises(UnsafeSetup, match="use --listen"):
        bind_address(False, [], False, host="0.0.0.0")
    assert parse_auth(["me:pa:ss"]) == [("me", "pa:ss")]
    with pytest.raises(UnsafeSetup, match="user:password"):
        parse_auth(["nopassword"])
    with pytest.raises(PermissionError):
        served_file("/tmp/runs_here", "/tmp/runs_here/../x")


def test_python_m_webui_from_the_repo_root_and_spo_studio():
    res = subprocess.run([sys.executable, "-m", "webui", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0 and "--listen" in res.stdout and "--auth" in res.stdout
    res = subprocess.run([sys.executable, "-m", "webui", "--listen"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "add --auth user:password" in res.stderr
    res = subprocess.run([sys.executable, "-m", "spo_studio.backend.cli", "studio", "--help"], capture_output=True,
                         text=True)
    assert res.returncode == 0 and "--runs" in res.stdout


def test_the_upload_area_is_bounded(page, tmp_path, pocket_lora):
    """Past `temp_max_bytes` the oldest files in the upload area go; an upload that cannot fit is refused."""
    from spo_studio.webui.app import TEMP_MAX_BYTES
    from spo_studio.webui.safety import upload_folder

    studio, client = page["studio"], page["client"]
    junk = upload_folder() / f"junk-{uuid.uuid4().hex[:8]}" / "old.bin"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"x" * 50_000)
    os.utime(junk, (1, 1))  # the oldest file there
    others = sum(f.stat().st_size for f in upload_folder().rglob("*") if f.is_file())
    try:
        studio.temp_max_bytes = others - 40_000 + pocket_lora.stat().st_size
        assert call(client, "/lora_info", handle_file(str(pocket_lora)), None)["family"] == "sd15"
        assert not junk.exists()  # the oldest file made room
        studio.temp_max_bytes = 10
        with pytest.raises(AppError, match="upload area is full"):
            call(client, "/lora_info", handle_file(str(pocket_lora)), None)
        assert sum(f.stat().st_size for f in upload_folder().rglob("*") if f.is_file()) <= 10
    finally:
        studio.temp_max_bytes = TEMP_MAX_BYTES


def test_every_named_endpoint_was_exercised():
    assert CALLED == ENDPOINTS, sorted(ENDPOINTS - CALLED)
