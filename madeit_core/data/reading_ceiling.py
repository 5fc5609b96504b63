"""How much of a rendered-text task a *perfect reader* could learn from the rows the zoo uses.

The offline benchmark's rendered-text tasks (``rendered_sst2``, ``rendered_imdb``,
``rendered_agnews``) show the first lines of a text on a small image. An encoder fine-tuned on
them has to learn to read *and* to classify from the few rows a profile allows. This module puts
a number on the second half alone: a bag-of-words logistic regression trained on the exact text
the fine-tuning rows show (:func:`madeit_core.data.render.visible_text`) and scored on the exact
text the evaluated test rows show. It reads words without error, so its accuracy bounds from
above what a linear word model can reach with that data; when it is low, a fine-tuned image
encoder at chance on the task says nothing against the merging methods.

It is reported beside it with the full texts (what the truncation costs) and with every training
row of the mirror (what more data would buy). Deterministic: the rows are the zoo's
(:func:`madeit_core.data.suites.select_rows`, probe rows first), the vectoriser and the solver
have no randomness.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from madeit_core.data.mirror import Mirror
from madeit_core.data.render import FONT_FRAC, MIN_FONT_PX, visible_text
from madeit_core.data.suites import TEXT_BASES, select_rows
from madeit_core.errors import MergeInputError


def bag_of_words_accuracy(train_texts: list[str], train_labels: np.ndarray, test_texts: list[str],
                          test_labels: np.ndarray, c: float = 1.0) -> float:
    """Test accuracy of a unigram bag-of-words logistic regression (L2, strength ``1/c``)."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    if len(set(np.asarray(train_labels).tolist())) < 2:
        raise MergeInputError("bag_of_words_accuracy: the training rows hold a single class")
    vec = CountVectorizer(token_pattern=r"(?u)\b\w+\b")
    a = vec.fit_transform(train_texts)
    model = LogisticRegression(C=c, max_iter=5000).fit(a, np.asarray(train_labels))
    return float(model.score(vec.transform(test_texts), np.asarray(test_labels)))


def reading_ceiling(task: str, train_cap: int, test_cap: int, test_pool_cap: int, render_size: int,
                    probe_fraction: float, mirror: str | os.PathLike[str] | None = None,
                    font_frac: float = FONT_FRAC, min_font_px: int = MIN_FONT_PX,
                    all_rows_cap: int | None = 20000) -> dict[str, Any]:
    """Bag-of-words accuracies for one rendered-text task with a profile's sizes (see the module
    docstring): ``visible`` (the zoo's fine-tuning rows and evaluated test rows, as drawn),
    ``full_text`` (same rows, whole texts) and ``visible_all_rows`` (the mirror's training rows
    up to ``all_rows_cap``, chosen as the zoo chooses them, as drawn), with the majority-class rate
    ``chance``."""
    from madeit_core.zoo import probe_rows

    if task not in TEXT_BASES:
        raise MergeInputError(f"reading_ceiling: {task!r} is not a rendered-text task ({sorted(TEXT_BASES)})")
    base = TEXT_BASES[task]
    m = Mirror(mirror)
    tr_texts, tr_y = m.texts(base, "train")
    te_texts, te_y = m.texts(base, "test")
    itr = select_rows(len(tr_y), train_cap)
    ite = select_rows(len(te_y), test_pool_cap)[:test_cap]
    n_probe = probe_rows(len(itr), probe_fraction)
    ft = itr[n_probe:]

    def shown(texts: list[str], rows: np.ndarray) -> list[str]:
        return [visible_text(texts[i], render_size, font_frac, min_font_px) for i in rows]

    test_shown, test_full, y_test = shown(te_texts, ite), [te_texts[i] for i in ite], te_y[ite]
    out = {
        "task": task, "base": base, "render_size": render_size,
        "rows": {"finetune": int(len(ft)), "test": int(len(ite)), "mirror_train": int(len(tr_y))},
        "chars_shown_mean": float(np.mean([len(t) for t in test_shown])),
        "chars_full_mean": float(np.mean([len(t) for t in test_full])),
        "chance": float(np.bincount(y_test).max() / len(y_test)),
        "visible": bag_of_words_accuracy(shown(tr_texts, ft), tr_y[ft], test_shown, y_test),
        "full_text": bag_of_words_accuracy([tr_texts[i] for i in ft], tr_y[ft], test_full, y_test),
    }
    all_rows = select_rows(len(tr_y), all_rows_cap)
    out["rows"]["all_rows"] = int(len(all_rows))
    out["visible_all_rows"] = bag_of_words_accuracy(shown(tr_texts, all_rows), tr_y[all_rows], test_shown, y_test)
    return out


def profile_reading_ceilings(profile: str = "offline", tasks: list[str] | None = None,
                             mirror: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """:func:`reading_ceiling` of every rendered-text task (default: all three) at a profile's sizes."""
    from madeit_core.profiles import get_profile

    p = get_profile(profile)
    return [reading_ceiling(t, p.train_cap, p.test_cap, p.test_pool_cap, p.render_size, p.probe_fraction, mirror)
            for t in (tasks or list(TEXT_BASES))]


__all__ = ["bag_of_words_accuracy", "profile_reading_ceilings", "reading_ceiling"]
