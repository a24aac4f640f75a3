"""The PRM that reads solutions as they are written (verifiers/step_reader.py): its scores
are a whole pass's, each step is scored when its text is complete, rows fork, a peek
moves nothing, it runs on a mesh, and beam search gives the same search with it as with
whole re-reads."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import PieceTokenizer
from o3lite import errors
from o3lite.data import formatting
from o3lite.model import heads
from o3lite.model import transformer as model_lib
from o3lite.parallel import mesh as sharding_lib
from o3lite.search import core
from o3lite.verifiers import reward_model as rm
from o3lite.verifiers import step_reader
from test_verifiers_models import QUESTION, RIGHT, _PieceTokenizer, _tiny_model

EXAMPLE = {"question": QUESTION, "answer": "3"}
WRONG = formatting.format_completion("3+4=7\n7*2=5\n5-1=4", "4")


@pytest.fixture(scope="module")
def prm():
  cfg, params = _tiny_model()
  return rm.Verifier(params, cfg, _PieceTokenizer(), "prm", seq_len=64, batch_size=4)


def _whole(prm, prompt, written):
  return [scores for _, scores in prm.score_sampled([prompt], [written])][0]


def test_each_rows_scores_are_a_whole_pass_scores_step_by_step(prm):
  tok = prm.tokenizer
  prompt = tok.encode(formatting.format_prompt(QUESTION))
  right, wrong = tok.encode(RIGHT), tok.encode(WRONG)
  # RIGHT: <think> 3+4 =7\n | 7*2 =4\n | 4-1 =3 </think> 3 ; one line at a time.
  cuts = [0, 3, 5, len(right)]
  before = prm.tokens_scored
  reader = step_reader.make(prm, [prompt], [EXAMPLE], tok, copies=2, pad_to=3)
  assert reader.rows == 6  # Padding problems' rows: there, never fed.
  for k, (a, b) in enumerate(zip(cuts, cuts[1:])):
    got = reader.extend([right[a:b], wrong[a:b], None, None, None, None])
    assert [len(s) for s in got] == [k + 1, k + 1, 0, 0, 0, 0]
  # The real prompt runs once for both rows (padding is not counted), then every
  # written token once.
  assert prm.tokens_scored - before == len(prompt) + len(right) + len(wrong)
  np.testing.assert_allclose(got[0], _whole(prm, prompt, right), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[1], _whole(prm, prompt, wrong), rtol=1e-5, atol=1e-6)
  assert reader.tokens(0) == right and reader.tokens(1) == wrong
  assert reader.text(1) == tok.decode(wrong)


def test_a_line_cut_mid_way_is_scored_as_it_stands_then_as_it_ends(prm):
  tok = prm.tokenizer
  prompt = tok.encode(formatting.format_prompt(QUESTION))
  right = tok.encode(RIGHT)
  reader = step_reader.make(prm, [prompt], [EXAMPLE], tok)
  partial = reader.extend([right[:2]])  # "<think>3+4": a step "3+4" so far.
  np.testing.assert_allclose(partial[0], _whole(prm, prompt, right[:2]), rtol=1e-5)
  assert len(partial[0]) == 1
  done = reader.extend([right[2:4]])  # "=7\n" completes "3+4=7"; "7*2" starts a line.
  np.testing.assert_allclose(done[0], _whole(prm, prompt, right[:4]), rtol=1e-5)
  assert len(done[0]) == 2 and done[0][0] != partial[0][0]  # Replaced, not appended.
  rest = reader.extend([right[4:]])
  np.testing.assert_allclose(rest[0], _whole(prm, prompt, right), rtol=1e-5)
  assert reader.extend([[]]) == rest and reader.extend([None]) == rest


def test_forked_rows_go_on_from_their_parent_and_a_peek_moves_nothing(prm):
  tok = prm.tokenizer
  prompt = tok.encode(formatting.format_prompt(QUESTION))
  right, wrong = tok.encode(RIGHT), tok.encode(WRONG)
  assert right[:3] == wrong[:3]  # Both begin "<think>3+4=7\n".
  reader = step_reader.make(prm, [prompt], [EXAMPLE], tok, copies=2)
  reader.extend([right[:3], right[:1]])
  reader.fork([0, 0])  # Row 1 now continues row 0, not its own "<think>".
  ahead = reader.peek([right[3:], wrong[3:]])
  assert reader.tokens(1) == right[:3] and len(reader.peek([[], []])[1]) == 1
  rest = reader.extend([right[3:], wrong[3:]])
  assert rest == ahead
  np.testing.assert_allclose(rest[0], _whole(prm, prompt, right), rtol=1e-5)
  np.testing.assert_allclose(rest[1], _whole(prm, prompt, wrong), rtol=1e-5)
  with pytest.raises(ValueError, match="1 token lists for 2 rows"):
    reader.extend([right])


def test_the_rereader_gives_the_cached_readers_scores(prm):
  tok = prm.tokenizer
  prompt = tok.encode(formatting.format_prompt(QUESTION))
  right, wrong = tok.encode(RIGHT), tok.encode(WRONG)
  cached = step_reader.make(prm, [prompt], [EXAMPLE], tok, copies=2)
  again = step_reader.Rereader(prm, [EXAMPLE], tok, copies=2)
  for reader in (cached, again):
    reader.extend([right[:2], wrong[:5]])  # Row 0 stops mid-line.
    reader.fork([1, 0])
  for a, b in zip(cached.extend([wrong[5:], right[2:]]), again.extend([wrong[5:], right[2:]])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert again.tokens(0) == wrong and again.tokens(1) == right


def test_a_verifier_on_another_tokenizer_re_reads_text_and_rows_must_fit(prm):
  tok = prm.tokenizer
  prompt = tok.encode(formatting.format_prompt(QUESTION))
  other = PieceTokenizer(list(tok.pieces[:-1]) + ["?"], keep_pad=False)
  assert isinstance(step_reader.make(prm, [prompt], [EXAMPLE], other), step_reader.Rereader)
  assert isinstance(step_reader.make(prm, [prompt], [EXAMPLE], _PieceTokenizer()),
                    step_reader.CachedReader)  # Another object, the same vocabulary.
  short = rm.Verifier(prm.params, prm.model_cfg, tok, "prm", seq_len=len(prompt) + 4)
  reader = step_reader.make(short, [prompt], [EXAMPLE], tok)
  reader.extend([tok.encode(RIGHT)[:3]])  # Prompt + 3 + EOS fits.
  with pytest.raises(errors.ConfigError, match="does not fit the verifier's seq_len"):
    reader.extend([tok.encode(RIGHT)[3:4]])


def test_on_a_mesh_rows_split_over_the_batch_axes(prm):
  tok = prm.tokenizer
  prompt = tok.encode(formatting.format_prompt(QUESTION))
  right = tok.encode(RIGHT)
  mesh = sharding_lib.make_mesh(("data", "fsdp", "tensor"), (4, 1, 2))
  params = jax.device_put(prm.params, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))
  on_mesh = rm.Verifier(params, prm.model_cfg, tok, "prm", 64, 4, mesh,
                        sharding_lib.DEFAULT_RULES)
  reader = step_reader.make(on_mesh, [prompt], [EXAMPLE], tok, copies=4)
  got = reader.extend([right[:k] for k in (3, 5, 7, len(right))])
  for k, scores in zip((3, 5, 7, len(right)), got):
    np.testing.assert_allclose(scores, _whole(prm, prompt, right[:k]), rtol=1e-5, atol=1e-6)
  with pytest.raises(errors.MeshError, match="do not split over the mesh's 4 batch shards"):
    step_reader.make(on_mesh, [prompt], [EXAMPLE], tok, copies=2)


class _Hidden:
  """The same PRM behind an object that is not a `reward_model.Verifier` (as an
  external PRM is): beam search re-reads its rows whole."""

  kind = "prm"

  def __init__(self, prm):
    self.prm = prm

  @property
  def tokens_scored(self):
    return self.prm.tokens_scored

  def score_steps(self, examples, solutions):
    return self.prm.score_steps(examples, solutions)


@pytest.mark.parametrize("lookahead", [0, 1])
def test_beam_search_reads_incrementally_what_it_would_re_read(lookahead):
  # One token per character: decoding and encoding are inverses, so re-reading a decoded
  # row sees the tokens the policy wrote. No think tags: every line is a step as it is
  # written (a "</think>" after others can make earlier lines steps after the fact,
  # which a reader of each step as it is written does not see).
  tok = PieceTokenizer(["\t", "</s>", "\n", "1", "2", "3", "+", "="])
  cfg = model_lib.ModelConfig.tiny(vocab_size=tok.vocab_size)
  policy = core.Policy(nn.unbox(model_lib.init_params(cfg, jax.random.key(0))), cfg, tok)
  head = nn.unbox(heads.init_scalar_head(cfg, jax.random.key(1)))
  head["head"] = jax.random.normal(jax.random.key(2), head["head"].shape)
  prm = rm.Verifier(head, cfg, tok, "prm", seq_len=128, batch_size=16)
  # 5 problems, 4 per sampler call: the second call has 3 padding problems.
  problems = [{"question": q, "answer": "3"} for q in ("1+2", "2+1=", "3", "12", "=")]
  sampling = core.Sampling(temperature=1.0, rows_per_call=16)
  run = lambda v: core.run_strategy("beam", problems, policy, v, 4, 0, sampling=sampling,
                                    expand=2, step_tokens=5, max_steps=4,
                                    lookahead=lookahead)
  before = prm.tokens_scored
  cached = run(prm)
  cached_tokens, before = prm.tokens_scored - before, prm.tokens_scored
  again = run(_Hidden(prm))
  assert prm.tokens_scored - before > cached_tokens  # Re-reading costs more.
  assert sum(len(s) for r in cached for s in r.step_scores) > len(problems)  # Steps read.
  for a, b in zip(cached, again):
    assert a.candidates == b.candidates and a.chosen == b.chosen
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4)
    for x, y in zip(a.step_scores, b.step_scores):
      np.testing.assert_allclose(x, y, rtol=1e-4)
    assert [[(n["parent"], n["text"]) for n in level] for level in a.tree] == [
        [(n["parent"], n["text"]) for n in level] for level in b.tree]
  assert sum(r.compute.verifier_tokens for r in cached) == cached_tokens
