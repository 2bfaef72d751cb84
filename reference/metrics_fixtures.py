"""Golden fixtures for ferrotune's text-generation metrics (crates/ferrotune/src/eval/metrics/).

Run from the repository root, with the reference environment (`scripts/setup-reference.sh`
pins rouge-score 0.1.2, sacrebleu 2.6.0 and nltk 3.10.4, which wrote the fixtures):

    .venv/bin/python reference/metrics_fixtures.py [--shared DIR]

`--shared` is the folder holding `data/dialogsum/dialogsum.test.jsonl` (default: `../shared`
beside the repository, as CI lays it out; `FERROTUNE_SHARED_DIR` overrides the default too).
Output is deterministic (fixed seeds, no timestamps): rerunning rewrites identical files.

Writes
  tests/fixtures/metrics/cases.json
    "versions"      the reference packages' versions.
    "cases"         ~300 prediction/reference rows. Synthetic rows carry their text
                    ("prediction", "references"); DialogSum rows carry only where the text is
                    ({"dialogsum": {"fname", "prediction": field, "references": [fields],
                    "split_sentences": bool}}): the Rust test reads the texts from the shared data
                    at test time, so no DialogSum text is copied into the repository.
                    `split_sentences` means every text had ". " replaced by ".\n" (so ROUGE-Lsum
                    sees several sentences). Each row has the expected scores of
                    `RougeScorer(["rouge1","rouge2","rougeL","rougeLsum"], use_stemmer=True)
                    .score_multi(references, prediction)` as {"p","r","f"} per type, and the
                    exact-match flags "em_strict" / "em_normalized" (see `em_*` below).
    "groups"        named subsets of the cases ("cases": ids, "max_refs": keep only that many
                    references per row, or null). Each has "bleu" (sacrebleu.corpus_bleu with
                    its defaults over the subset; rows with fewer references are padded with
                    None, which is how sacrebleu takes a varying number of references), with
                    its statistics, and "scores": what `score_rows` must return (mean of the
                    per-row ROUGE F-measures, BLEU, fraction of strict exact matches, n).
    "exact_match"   extra exact-match pairs aimed at the normalisation rules.
    "tokenize"      for each synthetic text: rouge-score's tokens (stemmed) and sacrebleu's
                    13a tokenisation (Tokenizer13a()(text), before the .rstrip() BLEU applies).
    "unicode"       "py_whitespace": every code point Python's str.isspace() accepts (what
                    str.split()/strip() use); "lower_ascii": every non-ASCII code point that
                    rouge-score's tokenizer does not drop, with the tokens it gives.
  tests/fixtures/metrics/stems.json
    [[word, stem], ...]: nltk PorterStemmer() (NLTK_EXTENSIONS mode, as rouge-score builds it)
    on ~2000 words: synthetic suffix combinations, random letter strings, Porter's examples and
    the vocabulary of the DialogSum test summaries.
"""

import argparse
import json
import os
import random
import re
import string

import nltk
import rouge_score
import sacrebleu
from nltk.stem import porter
from rouge_score import rouge_scorer, tokenizers
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "metrics")
TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]

SCORER = rouge_scorer.RougeScorer(TYPES, use_stemmer=True)
TOKENIZER = tokenizers.DefaultTokenizer(use_stemmer=True)
TOK13A = Tokenizer13a()
STEMMER = porter.PorterStemmer()


# ---------------------------------------------------------------- exact match (our definition)
def py_ws_split(s):
    return s.split()


def em_strict(pred, refs):
    """Exact match after stripping surrounding whitespace (Python's str.strip())."""
    return any(pred.strip() == r.strip() for r in refs)


def normalize(s):
    """Lowercase, delete ASCII punctuation (string.punctuation), collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in string.punctuation)
    return " ".join(s.split())


def em_normalized(pred, refs):
    return any(normalize(pred) == normalize(r) for r in refs)


# ---------------------------------------------------------------- synthetic rows
HAND = [
    ("The cat sat on the mat.", ["The cat sat on the mat."]),
    ("the cat sat on the mat", ["The cat sat on the mat."]),
    ("", ["A reference with words."]),
    ("A prediction with words.", [""]),
    ("", [""]),
    ("   ", ["   "]),
    ("!!! ??? ...", ["... ,,, ;;;"]),
    ("Pi is 3.14, not 3,14 or 3-14.", ["pi is 3.14 and e is 2.71"]),
    ("It costs $1,234.56 (approx.) in 2024-11-24.", ["The cost: $1,234.56 on 2024-11-24!"]),
    ("U.S.A. e-mail well-known co-operate", ["USA email well known cooperate"]),
    ("café naïve résumé Straße", ["cafe naive resume strasse"]),
    ("İstanbul has a \u212aelvin sign", ["istanbul has a kelvin sign"]),
    ("日本語 テキスト 😀 emoji only", ["emoji only"]),
    ("ÀÉÎÕÜ àéîõü", ["a e i o u"]),
    ("CASING Matters NOT", ["casing matters not"]),
    ("the the the the the", ["the cat the dog"]),
    ("the the the the the", ["the the"]),
    ("a a a b b b", ["a b a b a b"]),
    ("First sentence here.\nSecond sentence there.", ["First sentence there.\nSecond sentence here."]),
    ("One line only with all the words", ["One line only\nwith all\nthe words"]),
    ("\n\nleading newlines\n\n\ntrailing\n\n", ["leading newlines\ntrailing"]),
    ("windows\r\nline endings\r\n", ["windows\nline endings"]),
    ("tab\tseparated\twords", ["tab separated words"]),
    ("info\x1cseparator\x1dchars\x1eand\x1funit", ["info separator chars and unit"]),
    ("nbsp\u00a0and\u2003em\u3000space", ["nbsp and em space"]),
    ("flies dies ponies caresses cats", ["fly die pony caress cat"]),
    ("relational conditional rational valenci hesitanci", ["relate condition rational valence hesitance"]),
    ("generalization generalizations generalize general", ["generally generalised generality"]),
    ("running runs ran runner hopping hopped hops", ["run run ran runners hop hop hop"]),
    ("is as us bus was has his its", ["is as us bus was has his its"]),
    ("sky skies dying lying tying news innings", ["sky sky die lie tie news inning"]),
    ("agreed feed bled plastered motoring sing", ["agree feed bleed plaster motor sings"]),
    ("happy happiness happily happier", ["happi happy"]),
    ("yyyy yayay eyes toy toys enjoy enjoyment", ["yyy yay eye toy toys enjoying"]),
    ("abc123 123abc 2000s 1990's 42nd", ["abc123 123abc 2000s 1990s 42nd"]),
    ("&amp; &lt;tag&gt; &quot;quoted&quot; <skipped> kept", ["& <tag> \"quoted\" kept"]),
    ("hyphen-\nated word-\nbreak", ["hyphenated wordbreak"]),
    ("Hello, world! How are you? I'm fine; thanks.", ["Hello world. How are you? I am fine, thanks!"]),
    ("Numbers: 1, 2, 3. Then 4.5 and 6,7 and 8-9 and -10.", ["numbers 1 2 3 then 4.5 and 6,7"]),
    ("a.b,c .d ,e f. g,", ["a . b , c . d , e f . g ,"]),
    ("x", ["x"]),
    ("x", ["y"]),
    ("short", ["a much longer reference sentence with many more words than the prediction has"]),
    ("a much longer prediction sentence with many more words than the reference has", ["short"]),
    ("one two three", ["one two three four", "one two", "three two one"]),
    ("one two three four five", ["one two three four five six", "one two three four"]),
    ("the quick brown fox jumps over the lazy dog",
     ["the quick brown dog jumps on the log", "a fast brown fox leaps over a lazy dog", ""]),
    ("the quick brown fox", ["", "the quick brown fox"]),
    ("completely different words", ["nothing in common here", "also nothing shared"]),
    ("Summary one.\nSummary two.\nSummary three.",
     ["Summary three.\nSummary two.\nSummary one.", "Summary one two three."]),
    ("\n", ["\n\n"]),
    (" \n \n ", ["words"]),
    ("words", [" \n "]),
    ("matching four gram here please and more", ["matching four gram here please and more"]),
    ("cat dog bird fish", ["fish bird dog cat"]),
    ("alpha beta gamma delta epsilon", ["alpha beta gamma xi epsilon zeta"]),
    ("It's John's book, isn't it?", ["its johns book isnt it"]),
    ("e.g. i.e. etc. vs.", ["eg ie etc vs"]),
    ("ALL CAPS SHOUTING TEXT", ["all caps shouting text"]),
    ("Ends with tokenized period .", ["Ends with tokenized period."]),
    ("the cat sat on the mat with a hat all day long", ["the cat sat on the mat", "the cat sat"]),
]

WORDS = (
    "the a an of to in on at for with by from and or but not is are was were be been being "
    "has have had do does did will would can could should may might must this that these those "
    "person man woman child people friend manager customer doctor teacher student driver "
    "run runs running ran runner study studies studied studying student relate relational "
    "relation relations condition conditional generalize generalization general generally "
    "happy happiness happily hope hopeful hopefulness hoping hoped hop hopping hopped "
    "fly flies flying flew die dies dying died lie lies lying tie ties tying sky skies "
    "agree agreed agreement feed fed bleed bled motor motoring sing sings singing "
    "book books booking booked call calls calling called meet meeting meetings met "
    "decide decides decided decision decisions suggest suggests suggestion suggestions "
    "office offices official officially communicate communication communications "
    "employ employee employees employer employment travel travels travelled traveling "
    "price prices priced pricing cost costs costly buy buys bought buying sell sold selling "
    "day days today tomorrow yesterday week weeks month months year years time times "
    "quick quickly quicker quickest slow slowly slower good better best bad worse worst "
    "nice nicer nicest new newer newest news old older oldest big bigger biggest "
    "city cities country countries party parties company companies family families "
    "hospital hospitals operate operation operator operational activate activation "
    "electric electrical electricity effective effectiveness adjust adjustable adjustment "
    "depend dependent dependence adopt adoption communism formal formalize formality "
    "sensitive sensitivity sensible sensibility callous callousness decisive decisiveness "
    "feudal feudalism digitize digitizer predicate predication triplicate revival "
    "allowance inference airliner gyroscopic defensible irritant replacement homologous "
    "bowdlerize probate rate cease controlling control roll rolling logically geology"
).split()

PUNCT_TOKENS = [",", ".", "!", "?", ";", ":", "'s", "-", "(", ")", "\"", "&", "%", "/"]
NUMBERS = ["3", "42", "3.5", "1,200", "$20", "10-20", "2024", "7.25%", "0.5", "99th"]


def rand_sentence(rng, n_min=4, n_max=18):
    n = rng.randint(n_min, n_max)
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.08:
            out.append(rng.choice(NUMBERS))
        else:
            w = rng.choice(WORDS)
            c = rng.random()
            if c < 0.1:
                w = w.capitalize()
            elif c < 0.13:
                w = w.upper()
            out.append(w)
        if rng.random() < 0.12:
            out.append(rng.choice(PUNCT_TOKENS))
    s = ""
    for tok in out:
        if s and not (tok in {",", ".", "!", "?", ";", ":", "'s"} and rng.random() < 0.8):
            s += " "
        s += tok
    if rng.random() < 0.7:
        s += rng.choice([".", "!", "?", " ."])
    return s[0].upper() + s[1:] if rng.random() < 0.6 else s


def perturb(rng, text):
    toks = text.split(" ")
    out = []
    for t in toks:
        r = rng.random()
        if r < 0.1:
            continue  # drop
        if r < 0.2:
            out.append(rng.choice(WORDS))  # substitute
            continue
        if r < 0.24:
            out.extend([t, t])  # repeat
            continue
        out.append(t)
    if len(out) > 2 and rng.random() < 0.3:
        i = rng.randrange(len(out) - 1)
        out[i], out[i + 1] = out[i + 1], out[i]
    if not out:
        out = [rng.choice(WORDS)]
    return " ".join(out)


def rand_text(rng, sentences):
    return [rand_sentence(rng) for _ in range(sentences)]


def random_rows(rng, count):
    rows = []
    for k in range(count):
        n_sent = rng.choice([1, 1, 2, 3])
        truth = rand_text(rng, n_sent)
        sep = "\n" if rng.random() < 0.6 else " "
        n_refs = rng.choice([1, 1, 1, 2, 3, 4])
        refs = [sep.join(perturb(rng, s) for s in truth) for _ in range(n_refs)]
        if rng.random() < 0.15:
            refs[0] = sep.join(truth)
        pred_sents = [perturb(rng, s) for s in truth]
        if rng.random() < 0.2:
            rng.shuffle(pred_sents)
        psep = sep if rng.random() < 0.8 else ("\n" if sep == " " else " ")
        pred = psep.join(pred_sents)
        if rng.random() < 0.05:
            pred = refs[0]
        rows.append((pred, refs))
    return rows


# ---------------------------------------------------------------- DialogSum rows
def dialogsum_rows(shared):
    path = os.path.join(shared, "data", "dialogsum", "dialogsum.test.jsonl")
    with open(path, encoding="utf-8") as f:
        records = {r["fname"]: r for r in map(json.loads, f)}
    specs = []
    for i in range(40):
        fname = f"test_{i * 12}"
        if i < 16:
            spec = ("summary1", ["summary2"], False)
        elif i < 28:
            spec = ("summary1", ["summary2", "summary3"], False)
        elif i < 34:
            spec = ("summary2", ["summary3"], True)
        else:
            spec = ("summary3", ["summary1", "summary2"], True)
        specs.append({"fname": fname, "prediction": spec[0], "references": spec[1],
                      "split_sentences": spec[2]})
    return records, specs


def dialogsum_texts(records, spec):
    rec = records[spec["fname"]]
    fix = (lambda s: s.replace(". ", ".\n")) if spec["split_sentences"] else (lambda s: s)
    return fix(rec[spec["prediction"]]), [fix(rec[f]) for f in spec["references"]]


# ---------------------------------------------------------------- scoring
def rouge_entry(pred, refs):
    s = SCORER.score_multi(refs, pred)
    return {k: {"p": s[k].precision, "r": s[k].recall, "f": s[k].fmeasure} for k in TYPES}


def bleu_entry(preds, refs_list):
    n = max(len(r) for r in refs_list)
    streams = [[r[k] if k < len(r) else None for r in refs_list] for k in range(n)]
    b = sacrebleu.corpus_bleu(preds, streams)
    return {"score": b.score, "counts": list(b.counts), "totals": list(b.totals),
            "sys_len": b.sys_len, "ref_len": b.ref_len, "bp": b.bp,
            "precisions": list(b.precisions)}


def stem_words(vocab_texts, rng):
    words = set()
    bases = ["relat", "condit", "hop", "run", "fly", "cri", "happ", "general", "sensibl",
             "feudal", "digit", "operat", "control", "agre", "fe", "bl", "plaster", "motor",
             "sing", "troubl", "siz", "fizz", "fail", "fil", "formal", "electr", "adjust",
             "depend", "adopt", "commun", "activ", "effect", "geo", "theo", "archaeo",
             "analog", "vietnam", "callous", "decis", "triplic", "reviv", "allow", "infer",
             "airlin", "gyroscop", "defens", "irrit", "replac", "homolog", "bowdler", "prob",
             "ceas", "rol", "enjoy", "play", "sky", "spi", "di", "ti", "li", "ski", "pon",
             "caress", "abc1", "x9", "y", "yy", "tr", "s", "ab", "ee", "oat", "ivy", "orrer"]
    suffixes = ["", "s", "es", "ies", "sses", "ss", "ed", "ied", "eed", "ing", "ly", "y",
                "ness", "ful", "fulness", "fulli", "ation", "ational", "tional", "ization",
                "izer", "ize", "ise", "ement", "ment", "ent", "entli", "ence", "enci", "ance",
                "anci", "able", "abli", "bli", "ible", "biliti", "aliti", "iviti", "iciti",
                "ism", "alism", "ive", "iveness", "ative", "ous", "ousli", "ousness", "alli",
                "eli", "logi", "ical", "icate", "alize", "al", "er", "ic", "ant", "ion", "ou",
                "ate", "iti", "ll", "e", "at", "bl", "iz"]
    for b in bases:
        for s in suffixes:
            words.add(b + s)
    porter_examples = (
        "caresses ponies ties caress cats feed agreed plastered bled motoring sing conflated "
        "troubled sized hopping tanned falling hissing fizzed failing filing happy sky "
        "relational conditional rational valenci hesitanci digitizer conformabli radicalli "
        "differentli vileli analogousli vietnamization predication operator feudalism "
        "decisiveness hopefulness callousness formaliti sensitiviti sensibiliti triplicate "
        "formative formalize electriciti electrical hopeful goodness revival allowance "
        "inference airliner gyroscopic adjustable defensible irritant replacement adjustment "
        "dependent adoption homologou communism activate angulariti homologous effective "
        "bowdlerize probate rate cease controll roll generalizations oscillators skies dying "
        "lying tying news innings inning outings outing cannings canning howe proceed exceed "
        "succeed dies flies spied died tied lies ies ied s ss a i y yy yyy yyyy ay ayy "
        "syzygy toy toys trees ivy oaten orrery by tr ee tree troubles private"
    ).split()
    words.update(porter_examples)
    for _ in range(500):
        n = rng.randint(1, 12)
        words.add("".join(rng.choice("aeiouybcdlnstz") for _ in range(n)))
    vocab = set()
    for t in vocab_texts:
        vocab.update(re.sub(r"[^a-z0-9]+", " ", t.lower()).split())
    vocab = sorted(vocab)
    rng.shuffle(vocab)
    words.update(vocab[:900])
    words = sorted(words)
    return [[w, STEMMER.stem(w)] for w in words]


def main():
    ap = argparse.ArgumentParser()
    default_shared = os.environ.get("FERROTUNE_SHARED_DIR",
                                    os.path.join(os.path.dirname(ROOT), "shared"))
    ap.add_argument("--shared", default=default_shared)
    args = ap.parse_args()
    rng = random.Random(20240611)
    os.makedirs(OUT, exist_ok=True)

    synthetic = [(p, list(r)) for p, r in HAND] + random_rows(rng, 200)
    records, ds_specs = dialogsum_rows(args.shared)

    cases = []
    texts = []  # (pred, refs) resolved, in case order
    for i, (pred, refs) in enumerate(synthetic):
        e = {"id": i, "prediction": pred, "references": refs}
        e.update(rouge_entry(pred, refs))
        e["em_strict"] = em_strict(pred, refs)
        e["em_normalized"] = em_normalized(pred, refs)
        cases.append(e)
        texts.append((pred, refs))
    n_syn = len(cases)
    for spec in ds_specs:
        pred, refs = dialogsum_texts(records, spec)
        e = {"id": len(cases), "dialogsum": spec}
        e.update(rouge_entry(pred, refs))
        e["em_strict"] = em_strict(pred, refs)
        e["em_normalized"] = em_normalized(pred, refs)
        cases.append(e)
        texts.append((pred, refs))

    def group(name, ids, max_refs=None):
        preds = [texts[i][0] for i in ids]
        refs = [texts[i][1][:max_refs] if max_refs else texts[i][1] for i in ids]
        rows = [rouge_entry(p, r) for p, r in zip(preds, refs)]
        n = len(ids)
        scores = {k: sum(r[k]["f"] for r in rows) / n for k in TYPES}
        bleu = bleu_entry(preds, refs)
        scores["bleu"] = bleu["score"]
        scores["exact_match"] = sum(em_strict(p, r) for p, r in zip(preds, refs)) / n
        scores["n"] = n
        return {"name": name, "cases": ids, "max_refs": max_refs, "bleu": bleu,
                "scores": scores}

    syn_ids = list(range(n_syn))
    ds_ids = list(range(n_syn, len(cases)))
    hand_ids = list(range(len(HAND)))
    groups = [
        group("synthetic", syn_ids),
        group("synthetic_first_ref", syn_ids, 1),
        group("hand", hand_ids),
        group("dialogsum", ds_ids),
        group("dialogsum_first_ref", ds_ids, 1),
        group("all", syn_ids + ds_ids),
    ]
    for k in range(0, n_syn, 10):
        groups.append(group(f"synthetic_chunk_{k}", syn_ids[k:k + 10]))
    for k in range(0, len(ds_ids), 10):
        groups.append(group(f"dialogsum_chunk_{k}", ds_ids[k:k + 10]))
    # Edge cases of the BLEU formula, each alone: no 4-grams at all (score 0 from the floored
    # log), 4-grams but no 4-gram match (exp smoothing), empty hypothesis (sys_len 0),
    # hypothesis longer than every reference (bp = 1), a tie in closest reference length.
    find = {p: i for i, (p, _) in enumerate(HAND)}
    for name, pred in [("one_two_three", "one two three"),
                       ("no_4gram_match", "cat dog bird fish"),
                       ("empty_hyp", ""),
                       ("longer_hyp", "the cat sat on the mat with a hat all day long"),
                       ("tie_closest", "one two three four five"),
                       ("partial_4gram", "alpha beta gamma delta epsilon"),
                       ("identical", "matching four gram here please and more")]:
        groups.append(group(f"edge_{name}", [find[pred]]))

    em_pairs = [
        ("Paris", ["Paris"]), (" Paris \n", ["Paris"]), ("paris", ["Paris"]),
        ("Paris.", ["Paris"]), ("The answer is: 42!", ["the answer is 42"]),
        ("the  answer\tis 42", ["The answer is 42."]), ("42", ["forty-two", "42"]),
        ("forty two", ["forty-two"]), ("fortytwo", ["forty-two"]), ("", [""]),
        ("", ["   "]), ("...", [""]), ("Ünïcödé", ["ünïcödé"]), ("Ünïcödé", ["unicode"]),
        ("a\x1cb", ["a b"]), ("\x1ca b\x1f", ["a b"]), ("x", ["y", "z"]),
        ("don't", ["dont"]), ("don't", ["don t"]), ("C++", ["c"]), ("$5", ["5"]),
        ("«quoted»", ["quoted"]), ("ΣΊΣΥΦΟΣ", ["σίσυφος"]), ("İ", ["i̇"]),
        ("yes\n", ["Yes"]), ("no", ["No.", "nope"]), ("\u00a0x\u00a0", ["x"]),
    ]
    em = [{"prediction": p, "references": r, "strict": em_strict(p, r),
           "normalized": em_normalized(p, r)} for p, r in em_pairs]

    syn_texts = []
    for p, refs in synthetic:
        for t in [p] + refs:
            if t not in syn_texts:
                syn_texts.append(t)
    tok = [{"text": t, "rouge_tokens": TOKENIZER.tokenize(t), "tok13a": TOK13A(t)}
           for t in syn_texts]

    ws = [cp for cp in range(0x110000) if chr(cp).isspace()]
    lower_ascii = []
    for cp in range(0x80, 0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        toks = TOKENIZER.tokenize(chr(cp))
        if toks:
            lower_ascii.append([cp, toks])

    out = {
        "versions": {"rouge_score": "0.1.2" if not hasattr(rouge_score, "__version__")
                     else rouge_score.__version__,
                     "sacrebleu": sacrebleu.__version__, "nltk": nltk.__version__},
        "cases": cases,
        "groups": groups,
        "exact_match": em,
        "tokenize": tok,
        "unicode": {"py_whitespace": ws, "lower_ascii": lower_ascii},
    }
    with open(os.path.join(OUT, "cases.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")

    vocab_texts = [texts[i][0] for i in range(len(texts))]
    vocab_texts += [r[k] for r in records.values() for k in ("summary1", "summary2", "summary3")]
    stems = stem_words(vocab_texts, rng)
    with open(os.path.join(OUT, "stems.json"), "w", encoding="utf-8") as f:
        f.write("[\n" + ",\n".join(json.dumps(pair) for pair in stems) + "\n]\n")
    print(f"{len(cases)} cases ({n_syn} synthetic, {len(ds_ids)} DialogSum), {len(groups)} groups, "
          f"{len(em)} exact-match pairs, {len(tok)} tokenised texts, {len(stems)} stems")


if __name__ == "__main__":
    main()
