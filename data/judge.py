r"""
The gold judge g(x, y) of the IMDb task: a sentiment classifier whose log-odds of "positive" score a
prompt + response, standing in for the human whose preferences we want (Ziegler et al. 2019; DPO paper,
Rafailov et al. 2023, section 6.1, which uses a trained sentiment classifier in the same role). Every
reward model and policy is checked against it; data.imdb.plackett_luce_ranking turns it into noisy rankings.

The classifier is NB-LR, logistic regression on naive-Bayes-scaled binary n-gram features (Wang & Manning
2012, "NBSVM", with a logistic loss in place of the SVM's hinge), fitted on the 25,000 labelled TRAIN
reviews and measured on the 25,000 TEST reviews:
  - words: lowercase, regex \w+(?:'\w+)* (so "don't", "isn't" stay one token) plus "!" and "?";
  - features: every unigram and bigram seen in >= min_df train reviews; x_j = 1 if present in the text;
  - NB scaling: r_j = log(p_j / |p|_1) - log(q_j / |q|_1) with p = alpha + the feature counts of the
    positive reviews and q the same for the negative ones; the model sees x_j r_j. Swapping the labels
    swaps p and q, so r -> -r exactly;
  - logistic regression: min_w,b mean_i BCE(sigmoid(sum_j x_ij r_j w_j + b), y_i) + l2 / 2 |w|^2,
    full batch, L-BFGS from w = 0, b = 0 for a fixed number of iterations. No randomness, so the fit is
    deterministic; the loss and the regulariser are symmetric in the labels, so swapping them gives
    w -> w, b -> -b, and negated log-odds.
The fitted judge stores coef_j = r_j w_j per n-gram, and g = b + sum of coef over the text's n-grams.
(The DPO paper's judge is a pretrained RoBERTa sentiment model; none can be downloaded here, and NB-LR is
within a few points of it on IMDb, reads in one screen and scores a PPO batch in milliseconds.)

l2 = 1e-4 was picked on a 20k/5k split of the train reviews; the README gives the judge's accuracy. It reads
written ratings too ("7/10" is the n-gram "7 10").

    python -m data.judge --data_dir=/path/to/root     # fits once (cached), prints accuracies and top n-grams
"""
import hashlib
import json
import re
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from common import UserError, atomic_write
from data.imdb import find_archive, read_reviews

JUDGE_VERSION = 1  # bump when the features or the fit change
SETTINGS = dict(min_df=3, nb_alpha=1.0, l2=1e-4, max_iter=100)
WORD = re.compile(r"\w+(?:'\w+)*|[!?]")
M = 1 << 31  # n-gram code = first word id * M + second word id (M - 1 for a unigram)


def words(text):
    """The judge's tokens of a text: lowercase words (apostrophes kept inside a word), "!" and "?"."""
    return WORD.findall(text.lower())


def _unique(x, return_inverse=False):
    """np.unique of an int64 array, by torch.unique (numpy 2's was 20x slower on 12M int64 here)."""
    out = torch.unique(torch.from_numpy(x), return_inverse=return_inverse)
    return tuple(t.numpy() for t in out) if return_inverse else out.numpy()


def _ngram_codes(texts, word_id, grow=False):
    """(rows, codes): one entry per unigram and bigram occurrence, rows (n,) the text's index, codes (n,)
    int64. Words not in word_id are dropped (with the bigrams they are in), or added if grow."""
    ids, rows = [], []
    for i, text in enumerate(texts):
        w = words(text)
        ids += [word_id.setdefault(t, len(word_id)) for t in w] if grow else [word_id.get(t, -1) for t in w]
        rows += [i] * len(w)
    ids, rows = np.array(ids, np.int64), np.array(rows, np.int64)
    uni = ids >= 0
    bi = uni[:-1] & uni[1:] & (rows[:-1] == rows[1:])  # both words known, in the same text
    codes = np.concatenate([ids[uni] * M + (M - 1), ids[:-1][bi] * M + ids[1:][bi]])
    return np.concatenate([rows[uni], rows[:-1][bi]]), codes


class GoldJudge:
    """A fitted NB-LR sentiment classifier: words (list[str], word id = position), ngrams ((F,) int64
    sorted n-gram codes), coef ((F,) float32, the log-odds weight of each n-gram), bias (float), info (dict)."""

    def __init__(self, words, ngrams, coef, bias, info=None):
        self.words, self.ngrams = list(words), np.asarray(ngrams, np.int64)
        self.coef, self.bias = np.asarray(coef, np.float32), np.float32(bias)
        self.info = dict(info or {})
        self.word_id = {w: i for i, w in enumerate(self.words)}

    def _features(self, texts, ngram_codes=None):
        """(rows, cols) of the binary feature matrix: text rows[k] holds n-gram cols[k] (each pair once).
        ngram_codes: _ngram_codes(texts, ...) if already computed."""
        rows, codes = ngram_codes or _ngram_codes(texts, self.word_id)
        F = len(self.ngrams)
        j = np.minimum(np.searchsorted(self.ngrams, codes), F - 1)
        hit = self.ngrams[j] == codes
        key = _unique(rows[hit] * F + j[hit])
        return key // F, key % F

    def log_odds(self, texts):
        """g(x, y) for each text (prompt + response, decoded): log P(positive) / P(negative). (N,) float32."""
        return self._score(*self._features(texts), len(texts))

    def _score(self, rows, cols, n):
        """g for n texts from their (rows, cols) features: bias + the sum of coef over each text's n-grams."""
        s = np.bincount(rows, weights=self.coef[cols], minlength=n)  # (n,) float64, summed in a fixed order
        return torch.from_numpy((s + self.bias).astype(np.float32))

    def prob_positive(self, texts):
        """sigmoid(g): (N,) float32."""
        return torch.sigmoid(self.log_odds(texts))

    def accuracy(self, texts, labels):
        """Fraction of texts where (g > 0) == label (labels: 0/1 ints or bools)."""
        return ((self.log_odds(texts) > 0) == torch.as_tensor(labels).bool()).float().mean().item()

    def ngram(self, code):
        """The text of an n-gram code: "word" or "word word"."""
        a, b = divmod(int(code), M)
        return self.words[a] if b == M - 1 else f"{self.words[a]} {self.words[b]}"

    def top_ngrams(self, k=15):
        """The k most positive and k most negative n-grams: (list[(str, weight)], list[(str, weight)])."""
        order = np.argsort(-self.coef, kind="stable")
        pick = lambda idx: [(self.ngram(self.ngrams[i]), float(self.coef[i])) for i in idx]
        return pick(order[:k]), pick(order[::-1][:k])

    @classmethod
    def fit(cls, texts, labels, min_df=3, nb_alpha=1.0, l2=1e-4, max_iter=100):
        """Fit on texts (list[str]) and labels (0/1) as described in the module docstring. Deterministic.
        Runs on one torch thread: on a busy 2-core machine, L-BFGS's many small vector ops on two threads
        waited on each other (measured: the IMDb fit took 58 s on two threads, 15 s on one)."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return cls._fit(texts, labels, min_df, nb_alpha, l2, max_iter)
        finally:
            torch.set_num_threads(threads)

    @classmethod
    def _fit(cls, texts, labels, min_df, nb_alpha, l2, max_iter):
        t0 = time.time()
        y = np.asarray(labels, np.float64)
        word_id = {}
        rows, codes = _ngram_codes(texts, word_id, grow=True)
        uniq, inv = _unique(codes, return_inverse=True)  # every n-gram seen; keep those in >= min_df texts
        df = np.bincount(_unique(rows * len(uniq) + inv) % len(uniq), minlength=len(uniq))
        if not (df >= min_df).any():
            raise UserError(f"no word or bigram is in >= min_df = {min_df} of the {len(texts)} texts; lower min_df")
        judge = cls(sorted(word_id, key=word_id.get), uniq[df >= min_df], np.zeros((df >= min_df).sum()), 0.0)
        rows, cols = judge._features(texts, (rows, codes))
        F = len(judge.ngrams)
        p = nb_alpha + np.bincount(cols, weights=y[rows], minlength=F)  # (F,) positive counts
        q = nb_alpha + np.bincount(cols, weights=1 - y[rows], minlength=F)
        r = np.log(p / p.sum()) - np.log(q / q.sum())  # (F,) log-count ratio
        X = torch.sparse_coo_tensor(torch.from_numpy(np.stack([rows, cols])), torch.from_numpy(r[cols]),
                                    (len(texts), F), check_invariants=False).coalesce()
        with warnings.catch_warnings():  # "sparse CSR support is in beta": mat-vecs are all we need of it
            warnings.simplefilter("ignore", UserWarning)
            X, Xt = X.to_sparse_csr(), X.t().coalesce().to_sparse_csr()  # (N, F), (F, N) for fast mat-vecs
        yt = torch.from_numpy(y)
        w = torch.zeros(F, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(1, dtype=torch.float64, requires_grad=True)

        def closure():  # loss and its gradient, written out (sparse autograd is slow and beta)
            with torch.no_grad():
                z = X @ w + b  # (N,) logits
                loss = torch.nn.functional.binary_cross_entropy_with_logits(z, yt) + 0.5 * l2 * (w * w).sum()
                err = torch.sigmoid(z) - yt  # (N,) d loss_i / d z_i
                w.grad = Xt @ err / len(yt) + l2 * w
                b.grad = err.mean().reshape(1)
            return loss

        opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe",
                                tolerance_grad=0, tolerance_change=0)
        opt.step(closure)
        loss = closure().item()
        judge.coef = (r * w.detach().numpy()).astype(np.float32)
        judge.bias = np.float32(b.item())
        judge.info = dict(settings=dict(min_df=min_df, nb_alpha=nb_alpha, l2=l2, max_iter=max_iter),
                          n_train=len(texts), n_ngrams=F, n_words=len(judge.words), train_loss=loss,
                          train_accuracy=((judge._score(rows, cols, len(texts)) > 0).numpy() == (y > 0)).mean().item(),
                          fit_seconds=round(time.time() - t0, 2))
        return judge

    def save(self, path):
        """torch.save the judge to path (common.atomic_write)."""
        with atomic_write(path) as tmp:
            torch.save(dict(version=JUDGE_VERSION, words=self.words, ngrams=torch.from_numpy(self.ngrams),
                            coef=torch.from_numpy(self.coef), bias=float(self.bias), info=json.dumps(self.info)),
                       tmp)

    @classmethod
    def load(cls, path):
        """A judge written by save(); its log-odds are bit-identical to the saved judge's.
        Raises UserError naming the file if it is missing, damaged or not a judge of this version."""
        try:
            blob = torch.load(path, weights_only=True)
            if blob["version"] != JUDGE_VERSION:
                raise ValueError(f"judge version {blob['version']}, expected {JUDGE_VERSION}")
            return cls(blob["words"], blob["ngrams"].numpy(), blob["coef"].numpy(), blob["bias"],
                       json.loads(blob["info"]))
        except Exception as e:  # torch.load raises many kinds for a damaged file
            raise UserError(f"{path}: cannot load the gold judge ({type(e).__name__}: {e}); delete it "
                            "(load_judge fits a new one)") from None


def load_judge(data_dir=None, cache_dir="data/cache", verbose=True, **settings):
    """The gold judge, fitted on the labelled train reviews of the IMDb archive (see data.imdb.find_archive
    for data_dir) and measured on the test reviews, then cached in cache_dir (None or "" disables it),
    keyed by the archive (path, size, mtime) and the settings (SETTINGS, overridable). Later calls load it.
    A damaged cache file is fitted again. Raises UserError for a missing or bad archive, or bad settings."""
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        raise UserError(f"unknown judge setting(s) {sorted(unknown)}; valid: {sorted(SETTINGS)}")
    settings = SETTINGS | settings
    s = settings
    if not (s["min_df"] >= 1 and s["nb_alpha"] > 0 and s["l2"] > 0 and s["max_iter"] >= 1):
        raise UserError(f"judge settings {s}: need min_df >= 1, nb_alpha > 0, l2 > 0, max_iter >= 1")
    archive = find_archive(data_dir)
    st = archive.stat()
    key = hashlib.sha1(json.dumps(dict(version=JUDGE_VERSION, archive=str(archive.resolve()), size=st.st_size,
                                       mtime=st.st_mtime_ns, **settings)).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"judge_{key}.pt" if cache_dir else None
    judge, t0 = None, time.time()
    if path is not None and path.is_file():
        try:
            judge = GoldJudge.load(path)
            if verbose:
                print(f"loaded the gold judge from cache {path} in {time.time() - t0:.2f} s")
        except UserError as e:  # a damaged cache is refitted, never fatal
            print(f"note: {e}; fitting it again")
    if judge is None:
        t0 = time.time()
        reviews = read_reviews(archive)
        read_s = time.time() - t0
        judge = GoldJudge.fit([r["text"] for r in reviews["train"]], [r["label"] for r in reviews["train"]],
                              **settings)
        judge.info.update(archive=str(archive), read_seconds=round(read_s, 2), n_test=len(reviews["test"]),
                          test_accuracy=judge.accuracy([r["text"] for r in reviews["test"]],
                                                       [r["label"] for r in reviews["test"]]))
        if path is not None:
            judge.save(path)
    if verbose:
        i = judge.info
        print(f"gold judge (NB-LR on {i['n_ngrams']:,} uni+bigrams, {i['settings']}): train accuracy "
              f"{i['train_accuracy']:.4f} ({i['n_train']:,} reviews), test accuracy {i['test_accuracy']:.4f} "
              f"({i['n_test']:,}); fitted in {i['fit_seconds']} s after reading the archive in {i['read_seconds']} s")
    return judge


def main():
    import argparse
    ap = argparse.ArgumentParser(description="fit (once) and describe the IMDb gold sentiment judge")
    ap.add_argument("--data_dir", default="")
    ap.add_argument("--cache_dir", default="data/cache")
    for k, v in SETTINGS.items():
        ap.add_argument(f"--{k}", type=type(v), default=v)
    judge = load_judge(**vars(ap.parse_args()))
    pos, neg = judge.top_ngrams(15)
    print("  most positive n-grams: " + ", ".join(f"{g!r} {c:+.2f}" for g, c in pos))
    print("  most negative n-grams: " + ", ".join(f"{g!r} {c:+.2f}" for g, c in neg))
    texts = ["This movie was wonderful, I loved every minute of it.", "This movie was a boring waste of time.",
             "This movie was"]
    t0 = time.time()
    g = judge.log_odds(texts * 171)  # 513 short texts, the size of a PPO batch
    print(f"  scored {len(g)} texts in {1000 * (time.time() - t0):.1f} ms; " +
          ", ".join(f"g({t!r}) = {x:+.2f}" for t, x in zip(texts, g.tolist())))


if __name__ == "__main__":
    from common import cli
    cli(main)
