"""The tokenizer against implementations we did not write.

Ground truth is OpenAI's own ``clip/simple_tokenizer.py`` (from the clip-anytorch package, loaded by
file path because ``import clip`` needs torchvision): it runs the full pipeline (ftfy, HTML
unescape twice, whitespace collapse, lower-case, BPE).  A second, independent check is Hugging
Face's Rust-backed ``CLIPTokenizer`` built from the ``vocab.json``/``merges.txt`` that clipforge
writes.  Every string of a large deterministic corpus must give exactly the same ids.
"""

from __future__ import annotations

import gzip
import importlib.util
import random
import unicodedata
from importlib import resources
from pathlib import Path

import pytest
import regex
import torch

import clipforge
from clipforge.text import clean_text

SOT, EOT = 49406, 49407


# --------------------------------------------------------------------------- references


def _load_openai_tokenizer():
    try:
        spec = importlib.util.find_spec("clip")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("OpenAI's tokenizer (pip install --no-deps clip-anytorch) is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "simple_tokenizer.py"
    if not path.is_file():
        pytest.skip(f"the installed clip package has no simple_tokenizer.py ({path})")
    module_spec = importlib.util.spec_from_file_location("_openai_simple_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer()


@pytest.fixture(scope="module")
def openai_tokenizer():
    return _load_openai_tokenizer()


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("hf_vocab")
    written = clipforge.get_tokenizer().save_hf_vocabulary(directory)
    assert sorted(p.name for p in written) == ["merges.txt", "vocab.json"]
    # from_pretrained reads exactly the two files (CLIPTokenizer(vocab_file=...) would silently
    # ignore the unknown keyword arguments and build an empty vocabulary).
    hf = transformers.CLIPTokenizer.from_pretrained(str(directory))
    # Guard against a vacuous comparison: the vocabulary really was loaded.
    assert len(hf) == 49408
    assert (hf.bos_token_id, hf.eos_token_id) == (SOT, EOT)
    assert hf("Hello World!")["input_ids"] == [SOT, 3306, 1002, 256, EOT]
    return hf


def _hf_ids(hf, texts: list[str]) -> list[list[int]]:
    """HF ids without the start/end tokens its post-processor adds."""
    out = []
    for ids in hf(texts)["input_ids"]:
        assert ids[0] == SOT and ids[-1] == EOT, ids
        out.append(ids[1:-1])
    return out


# --------------------------------------------------------------------------- corpus

WORDS = (
    "a an the photo picture image of with on in at by from dog dogs cat cats kitten puppy man "
    "woman child children people person group team player street road city car truck bus train "
    "bicycle motorcycle boat plane airplane bird birds horse cow sheep elephant giraffe zebra "
    "bear table chair couch bed kitchen bathroom room window door wall floor sky cloud clouds "
    "tree trees grass field beach ocean water river lake mountain snow rain sun sunset night "
    "red blue green yellow white black brown orange purple pink gray large small big little "
    "young old happy smiling sitting standing walking running riding holding eating playing "
    "looking flying parked next to near under over behind front top side two three several "
    "many some very is are was were has have its their his her our skateboard surfboard frisbee "
    "kite umbrella pizza sandwich cake banana apple broccoli laptop keyboard phone clock vase "
    "book scissors teddy toothbrush refrigerator oven microwave sink toilet tv remote bench"
).split()

TEMPLATES = [
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.",
    "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.",
    "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.", "the plastic {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a painting of the {}.", "a painting of a {}.", "a pixelated photo of the {}.",
    "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.",
    "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.",
    "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.",
    "a photo of the small {}.", "a photo of the weird {}.", "the cartoon {}.", "art of the {}.",
    "a drawing of the {}.", "a photo of the large {}.", "a black and white photo of a {}.",
    "the plushie {}.", "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.",
    "a toy {}.", "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.",
    "a tattoo of the {}.",
]

CLASSNAMES = [
    "tench", "goldfish", "great white shark", "tiger shark", "hammerhead shark", "electric ray",
    "cock", "hen", "ostrich", "brambling", "goldfinch", "house finch", "junco", "indigo bunting",
    "American robin", "bulbul", "jay", "magpie", "chickadee", "American dipper",
    "kite (bird of prey)",
    "bald eagle", "vulture", "great grey owl", "fire salamander", "smooth newt", "eft",
    "loggerhead sea turtle", "leatherback sea turtle", "mud turtle", "terrapin", "box turtle",
    "African rock python", "Indian cobra", "green mamba", "sea snake", "Saharan horned viper",
    "trilobite", "harvestman", "scorpion", "yellow garden spider", "tick", "centipede",
    "black grouse", "ptarmigan", "ruffed grouse", "prairie grouse", "peafowl", "quail",
    "sulphur-crested cockatoo", "lorikeet", "coucal", "bee eater", "hornbill", "hummingbird",
    "toucan", "duck", "red-breasted merganser", "goose", "black swan", "tusker", "echidna",
    "platypus", "jellyfish", "sea anemone", "brain coral", "flatworm", "nematode", "conch",
    "snail", "slug", "sea slug", "chiton", "chambered nautilus", "Dungeness crab", "rock crab",
    "fiddler crab", "red king crab", "American lobster", "spiny lobster", "crayfish",
    "hermit crab", "isopod", "white stork", "black stork", "spoonbill", "flamingo",
    "Shih Tzu", "Shih-Tzu", "Yorkshire Terrier", "St. Bernard", "German Shepherd Dog",
    "Pembroke Welsh Corgi", "Cardigan Welsh Corgi", "Bernese Mountain Dog", "Dalmatian",
    "jack-o'-lantern", "potter's wheel", "carpenter's kit", "Granny Smith", "T-shirt",
    "CD player", "hot dog", "dough", "meatloaf", "pizza", "pot pie", "burrito", "red wine",
    "espresso", "tea cup", "eggnog", "alp", "bubble", "cliff", "coral reef", "geyser",
    "lakeshore", "promontory", "sandbar", "beach", "valley", "volcano", "baseball player",
    "bridegroom", "scuba diver", "rapeseed", "daisy", "yellow lady's slipper", "corn", "acorn",
    "rose hip", "horse chestnut seed", "coral fungus", "agaric", "gyromitra", "stinkhorn mushroom",
    "earth star fungus", "hen of the woods mushroom", "bolete", "corn cob", "toilet paper",
    "Band-Aid", "yo-yo", "wok", "Windsor tie", "crash helmet", "CRT monitor", "iPod", "4x4",
]

UNICODE = [
    "東京タワーの写真", "一只猫坐在桌子上", "한국어 문장입니다", "漢字とひらがなとカタカナ",
    "صورة قطة على الطاولة", "مرحبا بالعالم", "עברית זה כיף", "यह एक बिल्ली की तस्वीर है",
    "नमस्ते दुनिया", "Фотография кошки на столе", "Привет, мир!", "ЁЛКА и ёлка",
    "Φωτογραφία μιας γάτας", "ΟΔΟΣ ΣΟΦΟΚΛΕΟΥΣ", "ὁ λόγος", "ภาพถ่ายแมวบนโต๊ะ", "สวัสดีครับ",
    "ক্যামেরা", "தமிழ் எழுத்து", "ქართული", "Հայերեն", "ኢትዮጵያ", "ᚠᛇᚻ᛫ᛒᛦᚦ",
    "Crème brûlée à la française", "naïve café résumé façade", "Ångström Øresund Æble",
    "Zürich Straße Größe", "ŁÓDŹ żółć", "Ça va? Où êtes-vous?", "İstanbul ılık ŞEHİR",
    "ĳ ŀ ŉ ǅ ǈ ǋ ǲ", "ß ẞ ﬁ ﬂ ﬀ ﬃ", "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３", "ｶﾀｶﾅ",
    "e\u0301 a\u0300 o\u0302 n\u0303 u\u0308", "Z\u0351\u036b\u0343a\u0310l\u0357g\u031co",
    "a\u0336b\u0336c\u0336", "x\u20d7 v\u20d7", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕄𝕒𝕥𝕙 𝐁𝐨𝐥𝐝", "ℌℑℜ ℕℤℚℝ",
    "½ ¼ ¾ ² ³ ⁴ ₁ ₂", "Ⅻ ⅻ ① ② ⑳", "٣٤٥ ١٢٣ ۱۲۳ १२३ ๑๒๓", "°C ℃ ℉ µm Ω ‰",
    "“quoted” ‘single’ «guillemets» „German“", "em—dash en–dash – ‒ ― … ·", "¡Hola! ¿Qué tal?",
    "\u200bzero\u200bwidth\u200b", "soft\u00adhyphen", "bidi \u202eevil\u202c text",
    "\ufeffbom at start", "tab\there", "no\u00a0break\u00a0space", "ideographic\u3000space",
    "thin\u2009space\u2002en\u2003em", "line\u2028separator\u2029para", "ogham\u1680space",
    "mongolian\u180evowel", "narrow\u202fnbsp", "math\u205fspace", "\U0001f600\u0301",
    "Ǆemal ǅemal ǆemal", "ﬅ ﬆ", "Ⓐⓑⓒ", "🄰🄱", "ʰʲʷ", "℡ ™ ℠", "₹ € £ ¥ ₩ ₿ $",
]

EMOJI = [
    "😀", "😂🤣", "👍🏽", "👩‍💻", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🏴‍☠️", "🇺🇸", "🇯🇵🇫🇷🇩🇪", "🇺", "❤️", "❤",
    "☺️", "#️⃣", "1️⃣", "🧑🏿‍🚀", "🐱‍👤", "🙈🙉🙊", "🍕🍔🍟", "i love my 🐶 and my 🐱!!",
    "🔥🔥🔥 so hot 🔥", "🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f",
    "👁️‍🗨️", "🫠🫡🫶", "⌚⌛⏰", "✅❌", "🤷‍♂️🤷‍♀️", "👋🏻👋🏼👋🏽👋🏾👋🏿",
]

HTML = [
    "Tom &amp; Jerry", "a &lt; b &gt; c", "it&#39;s a dog", "&quot;quoted&quot;",
    "double &amp;amp; escaped", "&amp;lt;tag&amp;gt;", "triple &amp;amp;amp; escaped",
    "&nbsp;space&nbsp;", "caf&eacute; &copy; 2020", "&#x1F600; smile", "&#128512;",
    "&hellip;&mdash;&ndash;", "&apos;apos&apos;", "&amp", "&ampersand", "& amp;",
    "<b>bold</b> &amp; <i>italic</i>", "&#65;&#66;&#67;", "&unknown; entity", "&#0;", "&#x110000;",
    "&lt;|endoftext|&gt;", "AT&amp;T", "R&amp;D", "fish &amp;amp;amp;amp; chips",
]

MOJIBAKE = [
    "cafÃ©", "naÃ¯ve", "Ã¼ber", "â€œquotedâ€\x9d", "donâ€™t", "Ã©lÃ¨ve", "ðŸ˜€", "Ã‰cole",
    "SeÃ±or GarcÃ­a", "â€”", "Â£100", "Ã¡Ã©Ã\xadÃ³Ãº", "The Mona Lisa doesnÃƒÂ¢Ã¢â€šÂ¬Ã¢â€žÂ¢t",
    "l\u2019humanit\u00e9", "\x1b[36mcolored\x1b[0m text", "ﬁnancial ﬂow",
]

NUMBERS = [
    "0", "7", "42", "1234567890", "3.14159", "1,000,000", "-273.15", "+1", "1e-10", "0x1F",
    "2023-01-01", "12:30:45", "$9.99", "100%", "1/2", "3rd 2nd 1st 4th", "v1.2.3", "ISO 9001",
    "007", "1" * 200, "9876543210" * 30, "3.0e8 m/s", "1.000.000,50", "(555) 123-4567",
]

PUNCT = [
    "!!!???...", "---", "'''", '"""', "...", "?!", "!?!?!?", "((()))", "[[]]", "{{}}", "<<>>",
    "***", "___", "~~~", "@#$%^&*", "//\\\\", "|||", ";;;", ":::", ",,,", "'", "''", "'s",
    "-_-", ":-)", ";)", ":D", "<3", "^_^", "o_O", "¯\\_(ツ)_/¯", "....!!!!", "a...b", "c--d",
    "http://example.com/path?q=1&r=2#frag", "user@example.com", "C:\\Users\\x", "#hashtag",
    "@mention", "ALL CAPS!!!", "camelCaseWord", "snake_case_word", "kebab-case-word",
]

CONTRACTIONS = [
    "it's", "don't", "they're", "we've", "I'm", "you'll", "he'd", "IT'S", "DON'T", "THEY'RE",
    "WE'VE", "I'M", "YOU'LL", "HE'D", "the dog's bone", "the DOG'S BONE", "'s'", "'t've",
    "rock'n'roll", "o'clock", "ma'am", "y'all'd've", "'ll'd're've'm", "don’t (curly)",
    "it``s", "'sup", "ain't", "'S", "'T 'RE 'VE 'M 'LL 'D", "s's's's", "'re're",
]

WHITESPACE = [
    "", " ", "  ", "\t", "\n", "\r\n", " \t\n\r\x0b\x0c ", "\u00a0", "\u3000", "\u2003",
    "  leading and trailing  ", "multiple    spaces   here", "tabs\tand\nnewlines\r\nmixed",
    "\n\nparagraph\n\n\nbreaks\n", "a \t \n b", "x\x0by\x0cz", "\x1cfile\x1dgroup\x1erec\x1funit",
]

CONTROL = [
    "null\x00byte", "bell\x07", "back\x08space", "del\x7fete", "esc\x1bape", "c1\x80\x81\x9f",
    "nel\x85line", "csi\x9bx", "\x01\x02\x03", "mixed\x00\x07\x1b\x7f\x9fcontrols", "\ufffd",
    "replacement \ufffd char", "private\ue000use", "\U0010fffd", "noncharacter\ufffe",
]

SPECIALS = [
    "<|startoftext|>", "<|endoftext|>", "a <|startoftext|> b", "a<|endoftext|>b",
    "<|startoftext|><|endoftext|>", "<|STARTOFTEXT|>", "<|EndOfText|>", "<|endoftext|",
    "<|endoftext", "<|startoftext|>hello<|endoftext|>", "<|start of text|>", "<|unk|>",
    "text with <|endoftext|> in the middle", "<|endoftext|>.", "(<|endoftext|>)",
]

SCRIPT_RANGES = [
    (0x20, 0x7E), (0xA0, 0x17F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x5FF), (0x600, 0x6FF),
    (0x900, 0x97F), (0xE00, 0xE7F), (0x1100, 0x11FF), (0x1E00, 0x1EFF), (0x2000, 0x206F),
    (0x2100, 0x22FF), (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0xFF00, 0xFFEF),
    (0x1F300, 0x1F6FF), (0x1F900, 0x1F9FF), (0x300, 0x36F), (0x0, 0x1F), (0x7F, 0x9F),
]


def _random_codepoints(rng: random.Random, n: int) -> str:
    chars = []
    for _ in range(n):
        lo, hi = rng.choice(SCRIPT_RANGES)
        c = chr(rng.randint(lo, hi))
        if 0xD800 <= ord(c) <= 0xDFFF:  # lone surrogates are not text
            c = "?"
        chars.append(c)
    return "".join(chars)


def _captions(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 18))]
        text = " ".join(words)
        style = rng.random()
        if style < 0.3:
            text = text.capitalize() + "."
        elif style < 0.45:
            text = text.title()
        elif style < 0.55:
            text = text.upper()
        elif style < 0.7:
            text = text.replace(" ", rng.choice(["  ", ", ", " - ", "\t", "\n"]), 3)
        out.append(text)
    return out


def _pools() -> list[list[str]]:
    return [UNICODE, EMOJI, HTML, MOJIBAKE, NUMBERS, PUNCT, CONTRACTIONS, WHITESPACE, CONTROL,
            SPECIALS, WORDS, CLASSNAMES]


def _random_mixes(rng: random.Random, n: int) -> list[str]:
    pools = _pools()
    seps = [" ", "", "  ", "\t", "\n", ", ", "-", "'", "&amp;", "\u00a0", "\u3000", "\u200b"]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 8)):
            if rng.random() < 0.15:
                parts.append(_random_codepoints(rng, rng.randint(1, 12)))
            else:
                parts.append(rng.choice(rng.choice(pools)))
        text = "".join(p + rng.choice(seps) for p in parts)
        roll = rng.random()
        if roll < 0.1:
            text = unicodedata.normalize("NFD", text)
        elif roll < 0.15:
            text = text.upper()
        elif roll < 0.2:
            text = text.encode("utf-8").decode("cp1252", errors="ignore")  # fresh mojibake
        out.append(text)
    return out


def _long_strings(rng: random.Random) -> list[str]:
    out = [
        " ".join(rng.choice(WORDS) for _ in range(1500)),
        "".join(rng.choice(UNICODE) for _ in range(300)),
        "".join(rng.choice(EMOJI) for _ in range(500)),
        "a" * 5000,
        "ab" * 3000,
        "x" * 300 + " " + "y" * 300,
        "supercalifragilisticexpialidocious" * 100,
        "9" * 4000,
        "!" * 3000,
        "&amp;" * 800,
        "\n".join(_captions(rng, 200)),
        _random_codepoints(rng, 4000),
    ]
    out += ["".join(_random_mixes(rng, 150)) for _ in range(6)]
    return out


def _unicode_forms(texts: list[str]) -> list[str]:
    out = []
    for text in texts:
        for form in ("NFC", "NFD", "NFKC", "NFKD"):
            out.append(unicodedata.normalize(form, text))
    return out


def _mojibake(texts: list[str]) -> list[str]:
    out = []
    for text in texts:
        for codec in ("cp1252", "latin-1"):
            out.append(text.encode("utf-8").decode(codec, errors="replace"))
    return out


def build_corpus() -> list[str]:
    rng = random.Random(20240531)
    corpus: list[str] = []
    corpus += [t.format(c) for t in TEMPLATES for c in CLASSNAMES]  # every prompt
    corpus += _captions(rng, 1500)
    for pool in _pools():
        corpus += pool
    corpus += _unicode_forms(UNICODE + CLASSNAMES[:40] + MOJIBAKE)
    corpus += _mojibake(UNICODE + ["café", "naïve", "über", "don’t", "“hi”", "£5", "😀"])
    corpus += [p.upper() for p in UNICODE + CONTRACTIONS + HTML]
    corpus += [f"{a} {b}" for a in CONTRACTIONS for b in ("dog", "CAT", "'s", "!!", "")]
    corpus += _random_mixes(rng, 2500)
    corpus += [_random_codepoints(rng, rng.randint(1, 40)) for _ in range(500)]
    corpus += _long_strings(rng)
    return corpus


CORPUS = build_corpus()
LONG = [t for t in CORPUS if len(t) >= 2000]


@pytest.fixture(scope="module")
def ours_ids() -> list[list[int]]:
    tok = clipforge.get_tokenizer()
    return [tok.encode(t) for t in CORPUS]


@pytest.fixture(scope="module")
def openai_ids(openai_tokenizer) -> list[list[int]]:
    return [openai_tokenizer.encode(t) for t in CORPUS]


def _first_mismatch(texts, ours, theirs):
    for text, a, b in zip(texts, ours, theirs):
        if a != b:
            return f"first mismatch for {text[:200]!r}:\n ours   {a[:40]}\n theirs {b[:40]}"
    return None


# --------------------------------------------------------------------------- exactness


def test_corpus_is_large_and_varied():
    assert len(CORPUS) > 5000
    assert len(LONG) >= 10
    assert "" in CORPUS and "<|endoftext|>" in CORPUS
    assert any(unicodedata.normalize("NFC", t) != t for t in CORPUS)
    # Long strings really exceed the model's context, so encode() is exercised without a limit.
    tok = clipforge.get_tokenizer()
    assert min(len(tok.encode(t)) for t in LONG) > 150


def test_encode_matches_openai_on_corpus(ours_ids, openai_ids):
    assert ours_ids == openai_ids, _first_mismatch(CORPUS, ours_ids, openai_ids)
    # Non-vacuous: a few strings tokenize to nothing, most do not.
    assert sum(1 for ids in ours_ids if ids) > 0.95 * len(CORPUS)


def test_tokenize_matches_openai_layout(openai_ids):
    """clip.tokenize's row layout (sot, ids, eot, zeros), rebuilt from OpenAI's encoder."""
    rows = [(t, ids) for t, ids in zip(CORPUS, openai_ids) if len(ids) <= 75][::7]
    assert len(rows) > 500
    texts = [t for t, _ in rows]
    expected = torch.zeros(len(rows), 77, dtype=torch.long)
    for row, (_, ids) in enumerate(rows):
        ids = [SOT, *ids, EOT]
        expected[row, : len(ids)] = torch.tensor(ids)
    assert torch.equal(clipforge.tokenize(texts), expected)


def test_decode_matches_openai(openai_tokenizer, ours_ids):
    tok = clipforge.get_tokenizer()
    checked = 0
    for text, ids in list(zip(CORPUS, ours_ids))[::3]:
        if SOT in ids or EOT in ids:  # ours stops at the end token (see test_decode_stops_at_eot)
            continue
        assert tok.decode(ids) == openai_tokenizer.decode(ids).strip(), text
        checked += 1
    assert checked > 3000


def test_decode_stops_at_eot():
    tok = clipforge.get_tokenizer()
    assert tok.decode([SOT, 320, 1929, EOT, 320, 2368, 0, 0]) == "a dog"
    assert tok.decode(tok.encode("a<|endoftext|>b")) == "a"


# Where Hugging Face's CLIPTokenizer legitimately differs from OpenAI's (checked character class by
# character class; OpenAI stays the ground truth and sees every string):
#
# 1. Special tokens.  HF cuts "<|startoftext|>"/"<|endoftext|>" out of the text before anything
#    else, wherever they occur and case-sensitively on the raw text.  OpenAI only finds them
#    where its split regex starts a piece at "<": after punctuation such as "(" or "\u200b" the
#    run ``[^\s\p{L}\p{N}]+`` swallows "(<|" and the literal becomes ordinary text; and it finds
#    "<|ENDOFTEXT|>" too, because it lower-cases first.  Strings where the number of special ids
#    OpenAI's rule yields differs from the number of literals HF would cut out are left out.
# 2. U+0345 COMBINING GREEK YPOGEGRAMMENI.  OpenAI compiles its split pattern with IGNORECASE in
#    the ``regex`` module; U+0345 case-folds to "ι", so it matches neither ``[\p{L}]+`` nor
#    ``[^\s\p{L}\p{N}]+`` and is silently dropped.  HF's Oniguruma pattern is case-sensitive
#    and keeps it as punctuation.  (A scan of every code point shows U+0345 is the only one whose
#    pieces change with IGNORECASE.)
# 3. NFC after lower-casing (cleaned-text comparison only).  HF normalises NFC -> whitespace ->
#    lower-case on whatever it gets, so on already-cleaned text it re-applies NFC after Python's
#    lower-casing; "İ".lower() == "i\u0307" followed by a lower-class combining mark gets its marks
#    canonically reordered, which OpenAI never does.
# 4. Context-dependent lower-casing (raw-text comparison only).  Python's str.lower applies the
#    Final_Sigma rule (word-final "Σ" -> "ς"); HF lower-cases character by character ("σ").
_SPECIAL_LITERAL = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>")
_YPOGEGRAMMENI = "\u0345"


def _hf_specials_agree(hf_input: str, ids: list[int]) -> bool:
    return len(_SPECIAL_LITERAL.findall(hf_input)) == sum(1 for i in ids if i in (SOT, EOT))


def _whitespace_case_only(text: str) -> bool:
    """clean_text(text) does nothing HF's normalizer (NFC, \\s+ -> " ", lower) does not do too.

    Only single spaces are stripped from the ends: HF's pre-tokenizer drops those, but Python's
    str.strip() also strips \\x1c-\\x1f, which are not Unicode white space and HF keeps.
    """
    simple = regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).lower().strip(" ")
    return clean_text(text) == simple


def test_encode_matches_huggingface_after_cleaning(hf_tokenizer, ours_ids):
    """HF has no ftfy/HTML step: feed it our cleaned text, compare the splitting and BPE."""
    texts, cleaned, ours, excluded = [], [], [], 0
    for text, ids in zip(CORPUS, ours_ids):
        clean = clean_text(text)
        if (_YPOGEGRAMMENI in clean or unicodedata.normalize("NFC", clean) != clean
                or not _hf_specials_agree(clean, ids)):
            excluded += 1
            continue
        texts.append(text)
        cleaned.append(clean)
        ours.append(ids)
    assert excluded < 0.02 * len(CORPUS)
    assert sum(1 for c in cleaned if _SPECIAL_LITERAL.search(c)) > 100  # specials still covered
    theirs = _hf_ids(hf_tokenizer, cleaned)
    assert ours == theirs, _first_mismatch(texts, ours, theirs)


def test_encode_matches_huggingface_on_raw_text(hf_tokenizer, ours_ids):
    """Where cleaning is only whitespace/case/NFC, HF on the *raw* text must agree too."""
    subset, ours = [], []
    for text, ids in zip(CORPUS, ours_ids):
        if not _whitespace_case_only(text) or _YPOGEGRAMMENI in text:
            continue
        if text.lower() != "".join(c.lower() for c in text):  # context-dependent (final sigma)
            continue
        if _hf_specials_agree(text, ids):
            subset.append(text)
            ours.append(ids)
    assert len(subset) > 0.6 * len(CORPUS)
    assert any(regex.search(r"[A-Z]", t) for t in subset)
    assert any(regex.search(r"\s\s|\t|\n|\u3000|\xa0", t) for t in subset)
    assert any(unicodedata.normalize("NFC", t) != t for t in subset)
    assert any(_SPECIAL_LITERAL.search(t) for t in subset)
    theirs = _hf_ids(hf_tokenizer, subset)
    assert ours == theirs, _first_mismatch(subset, ours, theirs)


def test_huggingface_exclusions_are_real_differences(openai_tokenizer, hf_tokenizer):
    """Each excluded class really differs from HF, and ours follows OpenAI on it."""
    tok = clipforge.get_tokenizer()
    cases = {
        "(<|endoftext|>)": "(<|endoftext|>)",     # 1: swallowed by the punctuation run
        "a <|ENDOFTEXT|> b": "a <|ENDOFTEXT|> b",  # 1: case-sensitive on raw text in HF
        "ab\u0345c": "ab\u0345c",                 # 2: dropped by OpenAI's IGNORECASE pattern
        "\u0130\u032b": clean_text("\u0130\u032b"),  # 3: NFC after lower-casing
        "ΟΔΟΣ": "ΟΔΟΣ",                           # 4: final sigma
    }
    for text, hf_input in cases.items():
        ids = tok.encode(text)
        assert ids == openai_tokenizer.encode(text), text
        assert ids != _hf_ids(hf_tokenizer, [hf_input])[0], text
    assert tok.encode("(<|endoftext|>)") == tok.encode("(<|") + tok.encode("endoftext|>)")
    assert tok.encode("a <|ENDOFTEXT|> b") == tok.encode("a") + [EOT] + tok.encode("b")
    assert tok.encode("ab\u0345c") == tok.encode("ab") + tok.encode("c")


def test_final_sigma_follows_python_lowercasing(openai_tokenizer):
    """The one raw-text HF exclusion, checked against OpenAI: word-final Σ lower-cases to ς."""
    tok = clipforge.get_tokenizer()
    text = "ΟΔΟΣ ΣΟΦΟΚΛΕΟΥΣ"
    assert clean_text(text) == "οδος σοφοκλεους"
    assert tok.encode(text) == openai_tokenizer.encode(text)
    assert tok.encode(text) == tok.encode("οδος σοφοκλεους")


# --------------------------------------------------------------------------- API contract


def test_hello_world_ids():
    ids = clipforge.tokenize("Hello World!")
    assert ids[0, :6].tolist() == [SOT, 3306, 1002, 256, EOT, 0]


def test_special_ids_and_vocab_size():
    tok = clipforge.get_tokenizer()
    assert tok.vocab_size == 49408
    assert tok.sot_token_id == SOT and tok.eot_token_id == EOT
    assert tok.encode("<|startoftext|>") == [SOT]
    assert tok.encode("<|endoftext|>") == [EOT]


def test_zero_padding_and_shapes():
    out = clipforge.tokenize(["a dog", "a photo of a cat on a table", ""])
    assert out.shape == (3, 77) and out.dtype == torch.int64
    for row in out.tolist():
        end = row.index(EOT)
        assert row[0] == SOT
        assert all(v == 0 for v in row[end + 1:])
        assert 0 not in row[: end + 1]
    assert out[2, :3].tolist() == [SOT, EOT, 0]
    single = clipforge.tokenize("a dog")
    assert single.shape == (1, 77) and single.dtype == torch.int64
    assert torch.equal(single[0], out[0])
    tok = clipforge.get_tokenizer()
    assert torch.equal(tok(["a dog", "a photo of a cat on a table", ""]), out)
    assert clipforge.tokenize([]).shape == (0, 77)
    assert clipforge.tokenize(iter(["a dog"])).shape == (1, 77)


def test_custom_context_length():
    out = clipforge.tokenize(["a dog", "a cat"], context_length=10)
    assert out.shape == (2, 10) and out.dtype == torch.int64
    assert out[0].tolist() == [SOT, 320, 1929, EOT, 0, 0, 0, 0, 0, 0]
    long = clipforge.tokenize("a photo of a big dog", context_length=120)
    assert long.shape == (1, 120)
    assert torch.equal(long[0, :77], clipforge.tokenize("a photo of a big dog")[0])
    with pytest.raises(clipforge.ContextLengthError):
        clipforge.tokenize("one two three four five", context_length=6)
    exact = clipforge.tokenize("one two three four", context_length=6)  # 4 words + sot + eot
    assert exact[0, -1].item() == EOT


def test_overlong_text_raises_with_token_count():
    text = " ".join(["dog"] * 100)
    assert issubclass(clipforge.ContextLengthError, ValueError)
    with pytest.raises(clipforge.ContextLengthError) as info:
        clipforge.tokenize(["short", text])
    assert "102" in str(info.value)  # 100 words + start + end
    with pytest.raises(ValueError):
        clipforge.tokenize(text)
    # 75 tokens of text fill the context exactly and must not raise.
    fits = clipforge.tokenize(" ".join(["dog"] * 75))
    assert fits[0, -1].item() == EOT and fits[0, 1:76].tolist() == [1929] * 75


@pytest.mark.parametrize("text", [" ".join(["dog"] * 100), LONG[0], LONG[-1],
                                  "".join(EMOJI) * 3, "ab" * 3000])
def test_truncate_keeps_eot_last(text, openai_tokenizer):
    """clip.tokenize(truncate=True): the first 77 ids, the last one replaced by the end token."""
    full = [SOT, *openai_tokenizer.encode(text), EOT]
    assert len(full) > 77
    out = clipforge.tokenize(text, truncate=True)
    assert out.shape == (1, 77)
    row = out[0].tolist()
    assert row[-1] == EOT
    assert row[:76] == full[:76]
    assert 0 not in row


def test_truncate_does_not_change_short_texts():
    texts = ["a dog", "a photo of a cat", ""]
    assert torch.equal(clipforge.tokenize(texts, truncate=True), clipforge.tokenize(texts))


@pytest.mark.parametrize("text", [
    "a photo of a dog", "hello world", "the quick brown fox jumps over the lazy dog",
    "a photo of a jack-o'-lantern.", "it's 3.14 and 1,000,000 dogs!", "東京 café naïve",
])
def test_decode_round_trip(text):
    tok = clipforge.get_tokenizer()
    decoded = tok.decode(tok.encode(text))
    # BPE word ends become spaces, so punctuation comes back space-separated.
    assert decoded.replace(" ", "") == clean_text(text).replace(" ", "")
    assert tok.encode(decoded) == tok.encode(text)
    ids = clipforge.tokenize(text)[0].tolist()
    assert tok.decode(ids) == decoded  # start token, end token and padding are dropped


def test_decode_simple_text_exactly():
    tok = clipforge.get_tokenizer()
    for text in ["a photo of a dog", "hello world", "two cats on a red couch"]:
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode(text.upper())) == text


def test_clean_text_matches_openai_steps():
    assert clean_text("  Tom &amp;amp; JERRY\t\n  ") == "tom & jerry"
    assert clean_text("cafÃ©") == "café"
    assert clean_text("e\u0301") == "\u00e9"  # ftfy's NFC
    assert clean_text("") == ""
    assert clean_text(" \t\n ") == ""


def test_vocabulary_and_licence_ship_in_package(openai_tokenizer):
    package = resources.files("clipforge.text")
    vocab = package / "bpe_simple_vocab_16e6.txt.gz"
    assert vocab.is_file()
    lines = gzip.decompress(vocab.read_bytes()).decode("utf-8").split("\n")
    assert len(lines) >= 48894 + 1
    assert lines[0].startswith("\"bpe_simple_vocab_16e6.txt#version")
    licence = package / "LICENSE-bpe_simple_vocab.txt"
    assert licence.is_file()
    text = licence.read_text(encoding="utf-8")
    assert "MIT" in text and "OpenAI" in text
    # Same vocabulary OpenAI's tokenizer builds from its own copy of the file.
    assert clipforge.get_tokenizer().encoder == openai_tokenizer.encoder


def test_saved_hf_vocabulary_files(tmp_path):
    import json

    paths = clipforge.get_tokenizer().save_hf_vocabulary(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert set(paths) == {tmp_path / "vocab.json", tmp_path / "merges.txt"}
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == SOT
    assert vocab["<|endoftext|>"] == EOT and sorted(vocab.values()) == list(range(49408))
    assert merges[0].startswith("#version") and len(merges) == 1 + 48894
