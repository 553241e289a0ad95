"""A small synthetic corpus, so the tiny preset runs anywhere, offline, with no data set to fetch.

It is *not* natural language: short stories generated from a grammar (English or Chinese), with
structure a tiny model can learn in a few hundred steps — names that recur within a story, pronoun
agreement, counted objects mentioned again, and ordered discourse markers ("First", "Then",
"After that", "Later", "Finally" / 首先, 然后, 接着, 后来, 最后) that make sentence order
predictable. Every document is a pure function of (seed, index).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

EN = {
    "names": {"anna": "she", "ben": "he", "clara": "she", "david": "he", "emma": "she", "felix": "he",
              "grace": "she", "henry": "he", "iris": "she", "jack": "he", "kate": "she", "leo": "he",
              "maya": "she", "noah": "he", "olga": "she", "paul": "he", "rosa": "she", "sam": "he"},
    "places": ["market", "school", "park", "library", "river", "garden", "station", "bakery", "museum",
               "harbor", "forest", "village", "bridge", "castle"],
    "objects": ["apples", "loaves of bread", "books", "flowers", "fish", "letters", "tools", "candles",
                "maps", "coins", "lamps", "baskets", "shells", "stones"],
    "verbs": ["bought", "found", "picked up", "carried", "counted", "cleaned", "painted", "wrapped"],
    "adjs": ["red", "old", "small", "heavy", "bright", "new", "green", "tiny", "large", "quiet"],
    "numbers": ["two", "three", "four", "five", "six", "seven"],
    "markers": ["First,", "Then", "After that,", "Later", "Finally,"],
    "moves": ["walked", "ran", "rode", "drove", "hurried"],
    "gifts": ["thanked", "helped", "visited", "called", "greeted"],
}

ZH = {
    "names": ["小明", "小红", "王芳", "李雷", "张伟", "刘洋", "陈静", "赵强", "孙丽", "周杰", "吴敏", "郑凯"],
    "places": ["市场", "学校", "公园", "图书馆", "河边", "花园", "车站", "面包店", "博物馆", "港口", "森林", "村子"],
    "objects": ["苹果", "面包", "书", "鲜花", "鱼", "信", "工具", "蜡烛", "地图", "硬币", "灯笼", "篮子"],
    "verbs": ["买了", "找到了", "拿起了", "搬走了", "数了数", "洗干净了", "画好了", "包好了"],
    "adjs": ["红色的", "旧的", "小小的", "沉重的", "明亮的", "崭新的", "绿色的", "大大的"],
    "numbers": ["两", "三", "四", "五", "六", "七"],
    "markers": ["首先", "然后", "接着", "后来", "最后"],
    "moves": ["走到", "跑到", "骑车到", "开车到", "赶到"],
    "gifts": ["感谢了", "帮助了", "拜访了", "打电话给", "问候了"],
}


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def story_en(rng: np.random.Generator) -> str:
    names = list(EN["names"])
    a, b = rng.choice(len(names), size=2, replace=False)
    hero, friend = names[a], names[b]
    pron = EN["names"][hero]
    place, place2 = rng.choice(EN["places"], size=2, replace=False)
    obj, adj, num = _pick(rng, EN["objects"]), _pick(rng, EN["adjs"]), _pick(rng, EN["numbers"])
    verb, move, gift = _pick(rng, EN["verbs"]), _pick(rng, EN["moves"]), _pick(rng, EN["gifts"])
    H, F = hero.capitalize(), friend.capitalize()
    m = EN["markers"]
    sents = [
        f"{m[0]} {H} {move} to the {place}.",
        f"{m[1]} {pron} {verb} {num} {adj} {obj} at the {place}.",
        f"{m[2]} {H} met {F} near the {place2}.",
        f"{m[3]} {H} and {F} took the {num} {obj} to the {place2}.",
        f"{m[4]} {F} {gift} {H} and went home.",
    ]
    keep = int(rng.integers(3, 6))
    text = " ".join(sents[:keep])
    if rng.random() < 0.5:  # people in the stories ask about them, too
        q = _pick(rng, [f"Where did {H} buy the {obj}?", f"How many {obj} did {F} find?", f"Who met {H} near the {place2}?",
                        f"Why did {H} go to the {place}?", f"What was the reason {F} went to the {place2}?",
                        f"Which friend saw {H} by the {place}?", f"What number of {obj} were taken to the {place2}?",
                        f"At which place did {H} get the {obj}?", f"For what did {F} walk to the {place}?"])
        text += " " + q
    return text


def story_zh(rng: np.random.Generator) -> str:
    a, b = rng.choice(len(ZH["names"]), size=2, replace=False)
    hero, friend = ZH["names"][a], ZH["names"][b]
    place, place2 = rng.choice(ZH["places"], size=2, replace=False)
    obj, adj, num = _pick(rng, ZH["objects"]), _pick(rng, ZH["adjs"]), _pick(rng, ZH["numbers"])
    verb, move, gift = _pick(rng, ZH["verbs"]), _pick(rng, ZH["moves"]), _pick(rng, ZH["gifts"])
    m = ZH["markers"]
    sents = [
        f"{m[0]}，{hero}{move}{place}。",
        f"{m[1]}{hero}在{place}{verb}{num}个{adj}{obj}。",
        f"{m[2]}，{hero}在{place2}遇到了{friend}。",
        f"{m[3]}{hero}和{friend}把{num}个{obj}带到了{place2}。",
        f"{m[4]}，{friend}{gift}{hero}，然后回家了。",
    ]
    keep = int(rng.integers(3, 6))
    return "".join(sents[:keep])


def document(language: str, seed: int, index: int) -> str:
    rng = np.random.default_rng([seed, index, 0x5354])
    return story_zh(rng) if language == "zh" else story_en(rng)


def write_corpus(path: Path, language: str, n_docs: int, seed: int = 0) -> Path:
    """Write ``n_docs`` synthetic stories, one document per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n_docs):
            fh.write(document(language, seed, i) + "\n")
    return path


# ------------------------------------------------------------------ synthetic fine-tuning tasks

QQP_INTENTS = {
    # intent: paraphrase templates over the same slots (name, obj, place)
    "buy": ["where did {n} buy the {o}?", "at which place did {n} get the {o}?", "where were the {o} bought by {n}?"],
    "count": ["how many {o} did {n} find?", "what number of {o} did {n} find?", "how many {o} were found by {n}?"],
    "meet": ["who met {n} near the {p}?", "which friend saw {n} near the {p}?", "who did {n} meet by the {p}?"],
    "go": ["why did {n} go to the {p}?", "what was the reason {n} went to the {p}?", "for what did {n} walk to the {p}?"],
    "carry": ["did {n} carry the {o} to the {p}?", "were the {o} taken to the {p} by {n}?", "did {n} take the {o} to the {p}?"],
}


def qqp_pair(rng: np.random.Generator) -> tuple[str, str, int]:
    """A question pair from the story world: duplicates share intent and slots (in other words);
    non-duplicates differ in one slot or in intent."""
    names = list(EN["names"])
    intent = _pick(rng, list(QQP_INTENTS))
    slots = {"n": _pick(rng, names), "o": _pick(rng, EN["objects"]), "p": _pick(rng, EN["places"])}
    a = _pick(rng, QQP_INTENTS[intent]).format(**slots)
    duplicate = bool(rng.random() < 0.5)
    if duplicate:
        b = _pick(rng, QQP_INTENTS[intent]).format(**slots)
    else:
        other = dict(slots)
        if rng.random() < 0.35:  # a hard negative: one slot changes
            key = _pick(rng, [k for k in ("n", "o", "p") if "{" + k + "}" in "".join(QQP_INTENTS[intent])])
            pool = {"n": names, "o": EN["objects"], "p": EN["places"]}[key]
            while other[key] == slots[key]:
                other[key] = _pick(rng, pool)
            b = _pick(rng, QQP_INTENTS[intent]).format(**other)
        else:
            b = _pick(rng, QQP_INTENTS[_pick(rng, [i for i in QQP_INTENTS if i != intent])]).format(**slots)
    return a.capitalize(), b.capitalize(), int(duplicate)


def write_qqp(folder: Path, n_train: int = 8000, n_dev: int = 500, n_test: int = 200, seed: int = 0) -> Path:
    """A synthetic paraphrase task in GLUE QQP's exact file layout (train/dev/test.tsv)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0x515150])
    qid = 1
    for name, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
        with open(folder / f"{name}.tsv", "w", encoding="utf-8") as fh:
            fh.write("id\tquestion1\tquestion2\n" if name == "test" else "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n")
            for i in range(n):
                a, b, y = qqp_pair(rng)
                if name == "test":
                    fh.write(f"{i}\t{a}\t{b}\n")
                else:
                    fh.write(f"{i}\t{qid}\t{qid + 1}\t{a}\t{b}\t{y}\n")
                qid += 2
    return folder


TNEWS_TOPICS = {
    "100": ("news_story", ["故事", "小明", "回家了", "村子"]), "101": ("news_culture", ["博物馆", "书", "地图", "灯笼"]),
    "102": ("news_entertainment", ["明星", "电影", "鲜花", "问候了"]), "103": ("news_sports", ["比赛", "跑到", "冠军", "球队"]),
    "104": ("news_finance", ["硬币", "市场", "买了", "价格"]), "106": ("news_house", ["房子", "村子", "搬走了", "花园"]),
    "107": ("news_car", ["开车到", "车站", "汽车", "骑车到"]), "108": ("news_edu", ["学校", "学生", "书", "老师"]),
    "109": ("news_tech", ["手机", "工具", "明亮的", "崭新的"]), "110": ("news_military", ["港口", "军队", "沉重的", "大大的"]),
    "112": ("news_travel", ["森林", "河边", "赶到", "地图"]), "113": ("news_world", ["世界", "港口", "大大的", "打电话给"]),
    "114": ("stock", ["股票", "市场", "硬币", "数了数"]), "115": ("news_agriculture", ["苹果", "村子", "篮子", "鱼"]),
    "116": ("news_game", ["游戏", "赶到", "拿起了", "小小的"]),
}


def write_tnews(folder: Path, n_train: int = 1500, n_dev: int = 300, n_test: int = 100, seed: int = 0) -> Path:
    """A synthetic 15-class Chinese title task in CLUE TNEWS's exact layout (JSON lines + labels.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0x544E])
    codes = list(TNEWS_TOPICS)
    filler = ZH["names"] + ZH["places"] + ZH["objects"]
    with open(folder / "labels.json", "w", encoding="utf-8") as fh:
        for code in codes:
            fh.write(json.dumps({"label": code, "label_desc": TNEWS_TOPICS[code][0]}) + "\n")
    for name, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
        with open(folder / f"{name}.json", "w", encoding="utf-8") as fh:
            for i in range(n):
                code = _pick(rng, codes)
                words = list(rng.choice(TNEWS_TOPICS[code][1], size=2, replace=False)) + [
                    _pick(rng, filler) for _ in range(2)]
                rng.shuffle(words)
                row = {"sentence": "".join(words) + "。", "keywords": ",".join(words[:2])}
                if name == "test":
                    row = {"id": str(i), **row}
                else:
                    row = {"label": code, "label_desc": TNEWS_TOPICS[code][0], **row}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return folder
