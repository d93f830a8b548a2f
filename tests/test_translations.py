"""The Portuguese notebooks keep the English code, cell for cell.

Comments and string literals may be translated; everything else in a code
cell (names, numbers, calls) and its tags must match the English cell
at the same position. A change to an English code cell that has not reached
the Portuguese edition fails here.
"""
import io
import json
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# From Python 3.12 on, an f-string is several tokens: its start, the literal
# parts, the code inside braces, and its end (tokenize's named constants; the
# numbers differ between versions). Before 3.12 it is one STRING token. The
# code inside the braces must match; the text around it may be translated,
# and a translation may put it before or after the first value.
_FSTRING_START = {getattr(tokenize, name) for name in ("FSTRING_START", "TSTRING_START")
                  if hasattr(tokenize, name)}
_FSTRING_REST = {getattr(tokenize, name) for name in ("FSTRING_MIDDLE", "FSTRING_END",
                                                       "TSTRING_MIDDLE", "TSTRING_END")
                 if hasattr(tokenize, name)}
ENGLISH = ROOT / "notebooks"
EDITIONS = [ROOT / "translations" / "pt-BR"]
NOTEBOOKS = ["01_train.ipynb", "02_serve.ipynb", "03_query.ipynb"]


def normalise(source: str) -> list:
    """Tokens of a code cell with comments dropped and string literals blanked.

    nbval markers are comments too, but they decide what is checked, so they
    are kept.
    """
    tokens = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            if "NBVAL" in tok.string:
                tokens.append(tok.string.strip())
            continue
        if tok.type in (tokenize.STRING, *_FSTRING_START):
            tokens.append("<str>")
        elif tok.type in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                          tokenize.ENDMARKER, *_FSTRING_REST):
            continue
        else:
            tokens.append(tok.string)
    return tokens


def cells(path: Path) -> list:
    return json.loads(path.read_text())["cells"]


def test_normalise_ignores_comments_and_strings_only():
    english = 'print("correct")  # say it\nx = 1\n'
    portuguese = 'print("correto")  # diga\nx = 1\n'
    assert normalise(english) == normalise(portuguese)
    assert normalise(english) != normalise('print("correto")\nx = 2\n')
    assert normalise("# NBVAL_CHECK_OUTPUT\nx") != normalise("x")


def test_normalise_blanks_the_text_of_f_strings():
    english = 'print(f"saved {count} images, {share:.1f} s each")\n'
    portuguese = 'print(f"{count} imagens salvas, {share:.1f} s cada")\n'
    assert normalise(english) == normalise(portuguese)
    assert normalise(english) != normalise('print(f"{count} imagens")\nx = 2\n')


@pytest.mark.parametrize("edition", EDITIONS, ids=lambda p: p.name)
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_translation_has_the_same_cells_and_code(edition, name):
    english, translated = cells(ENGLISH / name), cells(edition / name)
    assert [c["cell_type"] for c in translated] == [c["cell_type"] for c in english], \
        f"{edition.name}/{name}: cell kinds or count differ from the English notebook"
    for index, (en, tr) in enumerate(zip(english, translated)):
        if en["cell_type"] != "code":
            continue
        assert normalise("".join(tr["source"])) == normalise("".join(en["source"])), (
            f"{edition.name}/{name}, code cell {index} ({en.get('id')}) differs from English "
            "beyond comments and strings: copy the English change over")
        # Tags decide what nbval checks (nbval-check-output, nbval-ignore-output).
        assert tr.get("metadata", {}).get("tags", []) == en.get("metadata", {}).get("tags", []), (
            f"{edition.name}/{name}, code cell {index} ({en.get('id')}) has other tags than "
            "the English cell")


@pytest.mark.parametrize("edition", EDITIONS, ids=lambda p: p.name)
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_translation_prose_is_translated(edition, name):
    english, translated = cells(ENGLISH / name), cells(edition / name)
    same = [i for i, (en, tr) in enumerate(zip(english, translated))
            if en["cell_type"] == "markdown" and "".join(en["source"]).strip()
            and "".join(en["source"]) == "".join(tr["source"])]
    assert same == [], f"{edition.name}/{name}: markdown cells {same} are still in English"
