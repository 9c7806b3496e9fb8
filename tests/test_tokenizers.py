"""A checkpoint's own tokenizer: tokenizer.json folders (byte-level BPE as Llama 3 and Qwen ship it, and the
SentencePiece-style BPE of Mistral) read as transformers' AutoTokenizer reads them, pairs split as TRL 1.16's
DPOTrainer splits them, chat templates rendered as apply_chat_template renders them; the converter copies the
files, `data.tokenizer_path: null` picks init_from's tokenizer, the export carries it, bad files are named.

Every tokenizer is built here with HF `tokenizers` (nothing is downloaded) and saved with transformers'
`PreTrainedTokenizerFast.save_pretrained`."""

import functools
import json
import shutil
import types

import pytest

from jsmaug.data import batches as data, formats as pair_formats, tokenizer_files, tokenizer_folder
from jsmaug.data.tokenizer import Tokenizer

CORPUS = ["Hello world, this is a test.", "The quick brown fox jumps over the lazy dog.",
          "Question: Who is older?\nAnswer: Zoe", "naïve café 日本語 😀 Ελληνικά",
          "  spaces   and\ttabs\n\nnewlines",
          "12345 + 678 = 999", "What colour is the sky? It is blue. It is green.", "Name a colour. Blue, like grass."]
TEXTS = ["Hello world", " leading space", "  two leading", "a  b   c    d", "trailing  ", "x\n\ny", "tab\there\t",
         "naïve café 日本語 😀", "", " ", "line\n  indented", "Question: Who is older?\nAnswer: Zoe",
         "<|im_start|>user\nhi<|im_end|>\n", "a<|im_end|> b", "text <|begin_of_text|>x<|end_of_text|>",
         "<s> and </s> as text", "Answer: Zoe</s>", "a</s> b", "x<s>y<unk>z"]
PAIRS = [{"prompt": "Question: Who is older?\nAnswer:", "chosen": " Zoe", "rejected": " Omar"},
         {"prompt": "Hello wor", "chosen": "ld", "rejected": "ld peace"},  # tokens merged across the boundary
         {"prompt": "Q: 2+3?\nA:", "chosen": " 5<|im_end|>", "rejected": " 6"},  # Qwen's EOS typed at the end
         {"prompt": "Name a colour.", "chosen": " Blue 😀", "rejected": "\nGreen, like grass."}]
CONV = [{"prompt": [{"role": "user", "content": "What colour is the sky?"}],
         "chosen": [{"role": "assistant", "content": "It is blue."}],
         "rejected": [{"role": "assistant", "content": "It is green."}]},
        {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": " 2+2? "}],
         "chosen": [{"role": "assistant", "content": " 4"}], "rejected": [{"role": "assistant", "content": "five"}]}]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{- bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def _bytelevel_bpe(flavour: str):
    from tokenizers import Regex, Tokenizer as RustTokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import processors, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tk = RustTokenizer(models.BPE())
    if flavour == "qwen":  # Qwen2's pipeline, as transformers' Qwen2Tokenizer builds it
        tk.normalizer = normalizers.NFC()
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    else:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                    "<|im_start|>", "<|im_end|>"]
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(vocab_size=330, special_tokens=specials, show_progress=False,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if flavour == "qwen":
        tk.post_processor = processors.ByteLevel(trim_offsets=False)  # adds no token
    else:
        bos = tk.token_to_id("<|begin_of_text|>")
        tk.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                          pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                          special_tokens=[("<|begin_of_text|>", bos)])])
    return tk


def _sentencepiece_bpe():
    """Mixtral's SentencePiece model as the BPE tokenizer.json that Mistral and Llama 2 hubs ship (Prepend + Replace
    normaliser, byte fallback, <s> from the post-processor)."""
    from tokenizers import Tokenizer as RustTokenizer

    return RustTokenizer.from_str(json.dumps(tokenizer_files.tokenizer_json(Tokenizer().sp)))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tokenizers")
    specs = {
        "llama3": (_bytelevel_bpe("llama3"), dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"), LLAMA3),
        "qwen": (_bytelevel_bpe("qwen"), dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"), CHATML),
        "spbpe": (_sentencepiece_bpe(), dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"),
                  open("configs/chat_templates/mixtral_instruct.jinja").read()),
    }
    out = {}
    for name, (tk, special, template) in specs.items():
        fast = PreTrainedTokenizerFast(tokenizer_object=tk, **special)
        fast.chat_template = template
        fast.save_pretrained(root / name)
        out[name] = root / name
    # Qwen's hub folders name Qwen2Tokenizer, which transformers 5 rebuilds from the vocabulary: the same ids.
    shutil.copytree(out["qwen"], root / "qwen_class")
    cfg = json.loads((root / "qwen_class" / "tokenizer_config.json").read_text())
    (root / "qwen_class" / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "Qwen2Tokenizer"}))
    out["qwen_class"] = root / "qwen_class"
    return out


NAMES = ["llama3", "qwen", "qwen_class", "spbpe"]


@functools.lru_cache(maxsize=None)
def _auto(folder):
    """transformers' AutoTokenizer on a folder (loaded once per folder)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("name", NAMES)
def test_ids_special_tokens_and_added_tokens_equal_auto_tokenizer(folders, name):
    auto = _auto(folders[name])
    tok = Tokenizer(folders[name])
    assert tok.kind == "tokenizers" and tok.path == str(folders[name] / "tokenizer.json")
    assert (tok.bos_token, tok.bos_id) == (auto.bos_token, auto.bos_token_id)
    assert (tok.eos_token, tok.eos_id) == (auto.eos_token, auto.eos_token_id) and tok.eos_id is not None
    for text in TEXTS:
        assert tok.encode_with_special_tokens(text) == auto(text).input_ids, (name, text)
        assert tok.encode(text) == auto(text, add_special_tokens=False).input_ids, (name, text)
    for text in ("Hello world, this is a test.", "naïve café 日本語 😀"):
        assert tok.decode(tok.encode(text)) == auto.decode(auto(text, add_special_tokens=False).input_ids) == text
    first = tok.encode_with_special_tokens("Hello")[0]
    if name == "llama3":  # the post-processor adds <|begin_of_text|>, once
        assert first == tok.bos_id == auto.convert_tokens_to_ids("<|begin_of_text|>") and tok.prefix_ids == [first]
    elif name == "spbpe":
        assert first == tok.bos_id == 1 and tok.prefix_ids == [1]
        assert tok.encode(TEXTS[0]) == Tokenizer().sp.encode(TEXTS[0])  # SentencePiece's own ids
    else:  # Qwen: no BOS at all
        assert tok.bos_id is None and tok.prefix_ids == []
        assert tok.encode_with_special_tokens("Hello") == tok.encode("Hello")
    if name != "spbpe":  # an added token is one id, also inside text
        for special in ("<|im_start|>", "<|im_end|>"):
            assert tok.encode(special) == [auto.convert_tokens_to_ids(special)]
        assert tok.encode("a<|im_end|>b").count(auto.convert_tokens_to_ids("<|im_end|>")) == 1


def _trl_split(auto, rows):
    """TRL 1.16's DPOTrainer._prepare_dataset, unmodified, on `rows` (a stub trainer: it reads only _tokenizer)."""
    from datasets import Dataset
    from trl.trainer.dpo_trainer import DPOTrainer

    args = types.SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_end")
    out = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=auto), Dataset.from_list(rows), auto, args,
                                      "train")
    return [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in out]


@pytest.mark.parametrize("name", NAMES)
def test_pairs_and_conversations_split_as_trl_1_16_splits_them(folders, name, tmp_path):
    auto = _auto(folders[name])
    tok = Tokenizer(folders[name])
    cfg = data.DataConfig(max_length=512, max_prompt_length=512, chat_template="tokenizer")
    for rows, fname in ((PAIRS, "plain.jsonl"), (CONV, "conv.jsonl")):
        (tmp_path / fname).write_text("".join(json.dumps(r) + "\n" for r in rows))
        examples, _ = data.prepare(tmp_path / fname, cfg, tok)
        ours = [(e["prompt"].tolist(), e["chosen"].tolist(), e["rejected"].tolist()) for e in examples]
        assert ours == _trl_split(auto, rows), (name, fname)
    # Plain pairs: the joined text with the EOS string once, as jsmaug documents the rule.
    for row, (p, c, r) in zip(PAIRS, ours_plain := [
            tuple(x.tolist() for x in (e["prompt"], e["chosen"], e["rejected"]))
            for e in data.prepare(tmp_path / "plain.jsonl", cfg, tok)[0]]):
        for completion, ids in ((row["chosen"], c), (row["rejected"], r)):
            eos = "" if completion.endswith(auto.eos_token) else auto.eos_token
            assert p + ids == auto(row["prompt"] + completion + eos).input_ids
            assert ids[-1] == auto.eos_token_id and ids.count(auto.eos_token_id) == 1
    assert len(ours_plain) == len(PAIRS)


@pytest.mark.parametrize("name", NAMES)
def test_chat_template_renders_as_apply_chat_template_from_either_file(folders, name, tmp_path):
    auto = _auto(folders[name])
    # save_pretrained writes chat_template.jinja; an older folder has it in tokenizer_config.json instead.
    legacy = tmp_path / "legacy"
    shutil.copytree(folders[name], legacy)
    source = (legacy / "chat_template.jinja").read_text()
    (legacy / "chat_template.jinja").unlink()
    cfg = json.loads((legacy / "tokenizer_config.json").read_text())
    (legacy / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": source}))
    for folder, origin in ((folders[name], "chat_template.jinja"), (legacy, "tokenizer_config.json (chat_template)")):
        template = pair_formats.load_chat_template("tokenizer", Tokenizer(folder))
        assert template.origin.endswith(origin)
        for row in CONV:
            for msgs, gen in ((row["prompt"], True), (row["prompt"] + row["chosen"], False)):
                assert template.render(msgs, add_generation_prompt=gen) == auto.apply_chat_template(
                    msgs, tokenize=False, add_generation_prompt=gen), (name, origin)


def test_fingerprints_differ_between_tokenizers(folders):
    prints = [Tokenizer(folders[n]).fingerprint() for n in NAMES] + [Tokenizer().fingerprint()]
    assert len(set(prints[:2] + prints[3:])) == 4  # qwen_class differs from qwen in tokenizer_class only
    assert Tokenizer(folders["qwen"]).fingerprint() == Tokenizer(folders["qwen"] / "tokenizer.json").fingerprint()


def test_bad_tokenizer_files_are_named(folders, tmp_path):
    with pytest.raises(data.DataError, match=f"{tmp_path}: no tokenizer files in this folder"):
        Tokenizer(tmp_path)
    with pytest.raises(data.DataError, match="tokenizer not found"):
        Tokenizer(tmp_path / "missing")
    bad = tmp_path / "bad"
    shutil.copytree(folders["qwen"], bad)
    (bad / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(data.DataError, match=f"{bad / 'tokenizer.json'}: not a tokenizer.json"):
        Tokenizer(bad)
    (bad / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "NoSuchModel"}}')
    with pytest.raises(data.DataError, match=f"{bad / 'tokenizer.json'}: not a tokenizer.json"):
        Tokenizer(bad)
    shutil.copy(folders["qwen"] / "tokenizer.json", bad / "tokenizer.json")
    (bad / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(data.DataError, match=f"{bad / 'tokenizer_config.json'}: not valid JSON"):
        Tokenizer(bad)
    (bad / "tokenizer_config.json").write_text("{}")
    with pytest.raises(data.DataError, match=f"{bad / 'tokenizer_config.json'}: no eos_token"):
        Tokenizer(bad)
    (bad / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>"}')
    (bad / "chat_template.jinja").unlink()
    with pytest.raises(data.DataError, match=f"{bad} has no chat_template.jinja"):
        pair_formats.load_chat_template("tokenizer", Tokenizer(bad))


def test_converter_copies_the_tokenizer_init_from_uses_it_and_the_export_carries_it(folders, tmp_path, capsys):
    from hf_fixtures import make_hf_checkpoint

    from jsmaug import hf
    from jsmaug.cli import convert
    from jsmaug.train import checkpoint, run as train_run
    from jsmaug.train.config import load_run_config

    hf_dir = tmp_path / "hub"
    make_hf_checkpoint(hf_dir, vocab_size=512)  # the tokenizer's 330 tokens fit
    names = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
    for name in names:
        shutil.copy(folders["qwen"] / name, hf_dir / name)
    # A corrupt tokenizer.json stops the conversion before anything is written, naming the file.
    (hf_dir / "tokenizer.json").write_text("not json")
    assert convert.main(["--hf_dir", str(hf_dir), "--out_dir", str(tmp_path / "ck")]) == 2
    assert f"{hf_dir / 'tokenizer.json'}: not a tokenizer.json" in capsys.readouterr().err
    assert not (tmp_path / "ck").exists()
    shutil.copy(folders["qwen"] / "tokenizer.json", hf_dir / "tokenizer.json")
    assert convert.main(["--hf_dir", str(hf_dir), "--out_dir", str(tmp_path / "ck")]) == 0
    ck = tmp_path / "ck"
    for name in names + ["generation_config.json"]:
        assert (ck / name).read_bytes() == (hf_dir / name).read_bytes(), name
    assert f"tokenizer: {hf_dir / 'tokenizer.json'} (tokenizers, 330 tokens)" in capsys.readouterr().out

    # data.tokenizer_path: null -> init_from's own tokenizer (and its template for data.chat_template=tokenizer).
    assert tokenizer_folder.run_tokenizer_path(None, str(ck)) == str(ck / "tokenizer.json")
    assert tokenizer_folder.run_tokenizer_path("elsewhere", str(ck)) == "elsewhere"
    assert tokenizer_folder.run_tokenizer_path(None, None) is None  # Mixtral's, as before
    train = tmp_path / "conv.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in CONV * 4))
    cfg, _ = load_run_config("tiny_dpop", [f"init_from={ck}", f"data.train_path={train}", "data.eval_path=null",
                                           "data.chat_template=tokenizer", "train.batch_size=4",
                                           f"workdir={tmp_path / 'run'}"])
    run_data = train_run.load_data(cfg)
    assert run_data.tok.path == str(ck / "tokenizer.json") and run_data.chat_template == CHATML
    want = data.prepare(train, data.DataConfig(chat_template="tokenizer"), Tokenizer(folders["qwen"]))[0]
    assert [e["chosen"].tolist() for e in run_data.train] == [e["chosen"].tolist() for e in want]

    # The export carries the tokenizer files as they are; a run's other template replaces the folder's.
    config, params = checkpoint.load_params(ck)
    hf.save(tmp_path / "out", config, params, tokenizer_path=run_data.tok.path, chat_template=CHATML)
    for name in names:
        assert (tmp_path / "out" / name).read_bytes() == (hf_dir / name).read_bytes(), name
    hf.save(tmp_path / "out2", config, params, tokenizer_path=str(ck), chat_template=LLAMA3)
    assert (tmp_path / "out2" / "chat_template.jinja").read_text() == LLAMA3
    assert (tmp_path / "out2" / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    (tmp_path / "empty").mkdir()
    with pytest.raises(hf.CheckpointError, match=f"{tmp_path / 'empty'}: no tokenizer files in this folder"):
        hf.save(tmp_path / "out3", config, params, tokenizer_path=str(tmp_path / "empty"))
    assert not (tmp_path / "out3").exists()
