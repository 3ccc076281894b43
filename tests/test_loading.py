"""Model resolution and the trust_remote_code default."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from meft.adapter import loading
from meft.adapter.loading import ModelLoadError, resolve_model


def test_resolution_of_model_specs(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(str(gguf)).gguf == "m.gguf"
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path / "hf")).gguf is None
    assert resolve_model("org/name").path == "org/name"  # a hub id, from the local cache
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        (tmp_path / "empty").mkdir()
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match=r"must be a \.gguf"):
        (tmp_path / "weights.bin").write_bytes(b"x")
        resolve_model(str(tmp_path / "weights.bin"))


@pytest.mark.parametrize("trust", [False, True])
def test_remote_code_is_off_unless_asked(trust: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    seen: dict[str, Any] = {}

    def fake(path: str, **kwargs: Any) -> Any:
        seen.update(kwargs)
        raise OSError("stop here")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: True)  # past the cache
    source = loading.ModelSource("org/name", None, "org/name")
    with pytest.raises(ModelLoadError, match="stop here"):
        if trust:
            loading.load_model(source, trust_remote_code=True)
        else:
            loading.load_model(source)
    assert seen["trust_remote_code"] is trust
