"""Runtime choice and the TensorRT path (which skips, saying why, where TensorRT or a GPU is missing)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from _edge_support import base_onnx, fp16_of, int8_of, onnx_variant, target_data

from fedge.edge import tensorrt_engine
from fedge.edge.agreement import Thresholds, agreement
from fedge.edge.runtime import OnnxRuntimeModel, choose_runtime, load_model

REPO = Path(__file__).resolve().parents[1]


def test_runtime_choice_follows_what_the_device_has() -> None:
    chosen = choose_runtime()
    usable, _ = tensorrt_engine.available()
    providers = ort.get_available_providers()
    if usable:
        assert chosen == "tensorrt"
    elif "TensorrtExecutionProvider" in providers:
        assert chosen == "onnxruntime-tensorrt"
    elif "CUDAExecutionProvider" in providers:
        assert chosen == "onnxruntime-cuda"
    else:
        assert chosen == "onnxruntime-cpu"
    assert choose_runtime("onnxruntime-cpu") == "onnxruntime-cpu"
    with pytest.raises(ValueError, match="unknown runtime"):
        choose_runtime("tflite")
    if not usable:
        with pytest.raises(RuntimeError, match="not available"):
            choose_runtime("tensorrt")


def test_onnxruntime_model_serves_any_batch() -> None:
    model = load_model(base_onnx(), "onnxruntime-cpu")
    assert isinstance(model, OnnxRuntimeModel) and model.runtime == "onnxruntime-cpu"
    x = target_data().tensors[0].numpy()
    for n in (1, 7):
        out = model.predict(x[:n])
        assert out.shape == (n, 10) and out.dtype == np.float32


def test_tensorrt_module_imports_and_reports_why_it_cannot_run() -> None:
    usable, reason = tensorrt_engine.available()
    assert reason
    if not usable:
        with pytest.raises(tensorrt_engine.TensorRTError, match="cannot run here"):
            tensorrt_engine.build_engine(base_onnx())


def test_each_format_carries_its_precision_and_int8_engines_need_qdq() -> None:
    assert tensorrt_engine.onnx_precision(base_onnx()) == "fp32"
    assert tensorrt_engine.onnx_precision(int8_of()) == "int8"
    assert tensorrt_engine.onnx_precision(fp16_of(base_onnx())) == "fp16"
    with pytest.raises(tensorrt_engine.TensorRTError, match="Q/DQ"):  # refused before TensorRT is even needed
        tensorrt_engine.build_engine(base_onnx(), precision="int8")


def test_tensorrt_builds_each_format_refits_and_serves_plans() -> None:
    usable, reason = tensorrt_engine.available()
    if not usable:
        pytest.skip(f"TensorRT engine build needs TensorRT and a CUDA GPU: {reason}")
    x = target_data().tensors[0].numpy()[:16]
    reference = OnnxRuntimeModel(base_onnx()).predict(x)
    profile = tensorrt_engine.BatchProfile(1, 16, 64)
    model = tensorrt_engine.TensorRTModel.from_onnx(base_onnx(), batch=profile)  # fp32: TF32 off
    assert np.abs(model.predict(x) - reference).max() < 1e-3
    assert model.predict(x[:1]).shape == (1, 10)
    for fmt in (fp16_of(base_onnx()), int8_of()):  # precision from the ONNX: fp16 weights, Q/DQ nodes
        engine = tensorrt_engine.TensorRTModel.from_onnx(fmt, batch=profile)
        assert not Thresholds().failures(agreement(engine.predict(x), reference))
    updated = onnx_variant("shifted")
    refitted = model.with_weights(updated)  # same graph, new weights: no rebuild
    assert np.abs(refitted.predict(x) - OnnxRuntimeModel(updated).predict(x)).max() < 1e-3
    assert np.abs(model.predict(x) - reference).max() < 1e-3  # the serving engine is untouched
    assert model.plan is not None
    again = tensorrt_engine.TensorRTModel.from_plan(model.plan)  # a plan built for this device class
    np.testing.assert_allclose(again.predict(x), model.predict(x), atol=1e-5)
    assert tensorrt_engine.device_class()


def _patched_tensorrt_stubs(dest: Path) -> Path | None:
    """tensorrt-stubs 10.13 ships no py.typed and two syntax slips; copy and mend them so mypy can read them."""
    spec = importlib.util.find_spec("tensorrt_bindings")
    if spec is None or not spec.submodule_search_locations:
        return None
    src = Path(next(iter(spec.submodule_search_locations)))
    trt_spec = importlib.util.find_spec("tensorrt")
    if trt_spec is None or not trt_spec.submodule_search_locations:
        return None
    if dest.exists():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp / "tensorrt_bindings")
    shutil.copytree(Path(next(iter(trt_spec.submodule_search_locations))), tmp / "tensorrt")
    stub = tmp / "tensorrt_bindings" / "tensorrt.pyi"
    text = re.sub(r"\bin: ", "in_: ", stub.read_text())  # a parameter named `in`
    text = text.replace("power: Weights = None, channel_axis: int)", "power: Weights = None, channel_axis: int = ...)")
    stub.write_text(text)
    tmp.rename(dest)
    return dest


def test_tensorrt_module_typechecks_against_the_tensorrt_api() -> None:
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed")
    stubs = _patched_tensorrt_stubs(REPO / ".mypy_cache" / "tensorrt-stubs-patched")  # kept: mypy caches its analysis
    if stubs is None or not (stubs / "tensorrt_bindings" / "tensorrt.pyi").exists():
        pytest.skip("tensorrt-stubs is not installed")
    config = stubs.parent / "tensorrt-stubs-mypy.ini"  # fixed paths, so mypy's cache is reused between runs
    config.write_text(f"[mypy]\nmypy_path = {stubs}\n[mypy-tensorrt_bindings.*]\nignore_errors = True\n"
                      "[mypy-tensorrt.*]\nignore_errors = True\n")
    run = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(config), "--cache-dir",
                          str(stubs.parent / "tensorrt-check"), "edge/tensorrt_engine.py"],
                         capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


def test_a_token_batch_is_scored_on_its_real_next_tokens_and_fed_by_name() -> None:
    from fedge.edge.scoring import TOKEN_INPUTS, feeds, pack_tokens, scored

    ids = np.array([[5, 6, 7, 8], [1, 2, 0, 0]])
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    x = pack_tokens(ids, mask)
    assert x.shape == (2, 2, 4) and x.dtype == np.int64
    logits = np.random.default_rng(0).normal(size=(2, 4, 9)).astype(np.float32)
    rows, labels = scored(x, logits)
    # row 0 predicts tokens 6, 7, 8 from positions 0-2; row 1 only token 2 from position 0 (the rest is padding)
    assert labels.tolist() == [6, 7, 8, 2]
    np.testing.assert_array_equal(rows, np.concatenate([logits[0, :3], logits[1, :1]]))
    fed = feeds(TOKEN_INPUTS, x)
    np.testing.assert_array_equal(fed["input_ids"], ids) and np.testing.assert_array_equal(fed["attention_mask"], mask)
    assert feeds(("input",), np.zeros((2, 3)))["input"].dtype == np.float32
    with pytest.raises(ValueError, match="token inputs"):
        feeds(("input",), x)
    with pytest.raises(ValueError, match="logits"):
        scored(x, logits[:, :3])
    # a classifier's rows are its logits, labelled by what it was given
    assert scored(np.zeros((2, 3)), logits[:, 0], np.array([1, 2]))[1].tolist() == [1, 2]
