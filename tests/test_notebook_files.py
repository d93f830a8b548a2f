"""Stored notebooks are for people: clean outputs, one title, stable cell ids."""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted([*(ROOT / "notebooks").glob("*.ipynb"),
                    *(ROOT / "translations").glob("*/*.ipynb")])
NOISE = re.compile(
    r"/(work|tmp|root|home)/|cpu_feature_guard|dso_loader|oneDNN|cuda_|"
    r"Initialize GrpcChannelCache|\[=+>?\.*\]|\d+/\d+ \[=|\x1b\[")


def test_all_six_notebooks_exist():
    names = [str(p.relative_to(ROOT)) for p in NOTEBOOKS]
    for edition in ("notebooks", "translations/pt-BR"):
        for name in ("01_train", "02_serve", "03_query"):
            assert f"{edition}/{name}.ipynb" in names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_outputs_are_clean(path):
    for index, cell in enumerate(json.loads(path.read_text())["cells"]):
        for output in cell.get("outputs", []):
            text = "".join(output.get("text", "")) + "".join(
                output.get("data", {}).get("text/plain", ""))
            assert not NOISE.search(text), f"cell {index}: noisy output: {text[:300]!r}"
            assert output.get("name") != "stderr" or not text.strip(), \
                f"cell {index}: stderr output stored: {text[:300]!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_one_title_and_stable_cell_ids(path):
    cells = json.loads(path.read_text())["cells"]
    titles = [c for c in cells if c["cell_type"] == "markdown"
              and any(line.startswith("# ") for line in c["source"])]
    assert len(titles) == 1 and cells[0] is titles[0]
    ids = [c.get("id") for c in cells]
    assert all(ids) and len(set(ids)) == len(ids)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_test_plumbing_in_the_code_a_reader_sees(path):
    # nbval reads cell tags; markers and path searches do not belong in the code.
    code = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    for cell in code:
        source = "".join(cell["source"])
        assert "NBVAL" not in source, f"cell {cell['id']}: an nbval marker comment; use a tag"
        assert "sys.path" not in source, f"cell {cell['id']}: a sys.path search; helpers is installed"
    checked = [c for c in code if "nbval-check-output" in c.get("metadata", {}).get("tags", [])]
    assert checked, "no cell is checked by nbval"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_setup_cell_imports_helpers_before_tensorflow(path):
    first = next(c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
    source = "".join(first["source"])
    assert source.index("import helpers") < source.index("import tensorflow")
    assert "bash run.sh notebooks" in source and "pip install -e ." in source


@pytest.mark.parametrize("edition", ["notebooks", "translations/pt-BR"])
def test_the_model_is_defined_in_notebook_01_only(edition):
    """01 saves the whole model; 02 and 03 load it, so a change made in 01 reaches them."""
    def code(name):
        cells = json.loads((ROOT / edition / f"{name}.ipynb").read_text())["cells"]
        return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")

    train, serve, query = code("01_train"), code("02_serve"), code("03_query")
    assert train.count("def build_model") == 1
    assert 'MODEL_FILE = "mnist_cnn.keras"' in train and "model.save(MODEL_FILE)" in train
    for later in (serve, query):
        assert "def build_model" not in later and "load_weights" not in later
    assert 'tf.keras.models.load_model("mnist_cnn.keras"' in serve
    # 03 may run alone (a hosted notebook): 01's file, or a briefly trained model
    assert 'helpers.trained_model("mnist_cnn.keras")' in query
    assert 'model_file="mnist_cnn.keras"' in query
