"""WordNet 3.0 nouns from Debian's ``wordnet-base`` (``/usr/share/wordnet/data.noun``), parsed directly.

ImageNet-22K classes are noun synsets named by wnid ``n%08d`` (the synset's offset). This gives
every wnid its lemma and its hypernyms (``@`` and instance ``@i`` pointers): class names and
parents for class tables, and superclass labels for the semantic quality of learned groups.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

DEFAULT_PATH = "/usr/share/wordnet/data.noun"


@dataclass(frozen=True)
class Synset:
    wnid: str
    lemmas: tuple[str, ...]
    parents: tuple[str, ...]  # hypernym wnids
    gloss: str
    lexfile: int = 0          # lexicographer file: 5 = noun.animal, 6 = noun.artifact, ... (LEXFILES)

    @property
    def lemma(self) -> str:
        return self.lemmas[0]


def parse_line(line: str) -> Synset | None:
    """One ``data.noun`` line -> Synset (None for the license header)."""
    if not line or line.startswith("  "):
        return None
    data, _, gloss = line.partition(" | ")
    fields = data.split()
    offset, w_cnt = fields[0], int(fields[3], 16)
    words = [fields[4 + 2 * i].replace("_", " ") for i in range(w_cnt)]
    pos = 4 + 2 * w_cnt
    p_cnt = int(fields[pos])
    parents = []
    for i in range(p_cnt):
        symbol, target, target_pos = fields[pos + 1 + 4 * i: pos + 4 + 4 * i]
        if symbol in ("@", "@i") and target_pos == "n":
            parents.append("n" + target)
    return Synset("n" + offset, tuple(words), tuple(parents), gloss.strip(), int(fields[1]))


# WordNet 3.0's noun lexicographer files: ~26 coarse categories, a yardstick for a handful of
# groups over thousands of classes (Debian ships no `lexnames` file, so the names are listed here).
LEXFILES = {3: "noun.Tops", 4: "noun.act", 5: "noun.animal", 6: "noun.artifact", 7: "noun.attribute", 8: "noun.body",
            9: "noun.cognition", 10: "noun.communication", 11: "noun.event", 12: "noun.feeling", 13: "noun.food",
            14: "noun.group", 15: "noun.location", 16: "noun.motive", 17: "noun.object", 18: "noun.person",
            19: "noun.phenomenon", 20: "noun.plant", 21: "noun.possession", 22: "noun.process", 23: "noun.quantity",
            24: "noun.relation", 25: "noun.shape", 26: "noun.state", 27: "noun.substance", 28: "noun.time"}


def categories(wnids: list[str], path: str = DEFAULT_PATH) -> list[str] | None:
    """The lexicographer file (``noun.animal``, ...) of each wnid, or None when one is not a noun synset."""
    nouns = load_nouns(path)
    if not all(w in nouns for w in wnids):
        return None
    return [LEXFILES.get(nouns[w].lexfile, str(nouns[w].lexfile)) for w in wnids]


@lru_cache(maxsize=4)
def load_nouns(path: str = DEFAULT_PATH) -> dict[str, Synset]:
    """wnid -> Synset for every noun synset (~82k). Raises FileNotFoundError with the fix."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"WordNet not found at {path}; install Debian's wordnet-base "
                                "(apt-get install -y wordnet-base) or pass the path to data.noun")
    nouns = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            synset = parse_line(line)
            if synset is not None:
                nouns[synset.wnid] = synset
    return nouns


def is_wnid(name: str) -> bool:
    return len(name) == 9 and name[0] == "n" and name[1:].isdigit()


def describe(wnids: list[str], path: str = DEFAULT_PATH) -> list[dict]:
    """[{wnid, lemma, parent, parent_lemma}] for each wnid (first hypernym as the parent)."""
    nouns = load_nouns(path)
    rows = []
    for wnid in wnids:
        synset = nouns.get(wnid)
        if synset is None:
            raise KeyError(f"{wnid} is not a WordNet 3.0 noun synset")
        parent = synset.parents[0] if synset.parents else ""
        rows.append({"wnid": wnid, "lemma": synset.lemma, "parent": parent,
                     "parent_lemma": nouns[parent].lemma if parent in nouns else ""})
    return rows
