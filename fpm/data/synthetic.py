"""A small synthetic corpus, so the tiny preset runs anywhere, offline, with no data set to fetch.

It is *not* natural language: short stories generated from a grammar (English or Chinese), with
structure a tiny model can learn in a few hundred steps — names that recur within a story, pronoun
agreement, counted objects mentioned again, and ordered discourse markers ("First", "Then",
"After that", "Later", "Finally" / 首先, 然后, 接着, 后来, 最后) that make sentence order
predictable. Every document is a pure function of (seed, index).
"""

from __future__ import annotations

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
    return " ".join(sents[:keep])


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
