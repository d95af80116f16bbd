"""tokenizer_tools: train a Chinese BPE model, merge it into a base vocabulary, compare tokenizers.

The oracles: the base model's own protobuf (every id, score and type), SentencePiece's encoder of the
merged `tokenizer.model` (the `tokenizers` library and `transformers` must give exactly its ids),
the base tokenizer's own token boundaries, and token counts computed here by hand for `compare`.

The Chinese text is generated here, deterministically, from the word lists below: templates filled
with words from many topics, so a Chinese BPE model learns thousands of pieces that a base model
trained on mostly English text lacks.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from helpers import corpus_lines, train_sentencepiece

from nanotune.tokenizer import SPM_NORMAL, SPM_USER_DEFINED, load_sentencepiece_proto
from tokenizer_tools import compare, merge_spm, train_spm

SUBJECTS = ("我们 你们 他们 学生 老师 医生 工程师 农民 科学家 记者 作家 公司 政府 学校 医院 研究人员 年轻人 孩子们 父母 "
            "朋友 城市居民 游客 志愿者 专家 企业家 经理 员工 运动员 画家 音乐家 消费者 读者 观众 村民 厨师 司机 律师 护士 教授 市长").split()
PLACES = ("北京 上海 广州 深圳 杭州 成都 西安 南京 武汉 重庆 天津 苏州 长沙 昆明 青岛 大连 厦门 哈尔滨 乡村 山区 海边 草原 "
          "沙漠 图书馆 博物馆 公园 市场 车站 机场 实验室 农村 工厂 社区 大学 银行 超市 餐厅 广场").split()
TIMES = "今天 昨天 明天 去年 今年 明年 早上 晚上 周末 春天 夏天 秋天 冬天 最近 过去 将来 每天 有时 经常 上个月 下个星期".split()
VERBS = ("研究 讨论 发展 建设 学习 介绍 参观 访问 提高 改善 解决 分析 设计 制造 生产 销售 购买 使用 保护 支持 组织 参加 举办 "
         "完成 开始 推动 促进 加强 关注 了解 认识 发现 创造 管理 服务 培养 报道 准备 选择 调查 评估 规划 投资 探索 记录 整理 翻译 "
         "演奏 烹饪 修复").split()
OBJECTS = ("经济 文化 历史 技术 科学 教育 环境 交通 健康 医疗 农业 工业 旅游 音乐 电影 艺术 文学 哲学 数学 物理 化学 生物 地理 "
           "语言 社会 法律 新闻 网络 手机 电脑 软件 数据 人工智能 机器学习 能源 气候 资源 产品 质量 价格 方法 计划 项目 政策 制度 "
           "传统 习惯 节日 食物 水果 蔬菜 茶叶 书籍 报纸 杂志 建筑 桥梁 铁路 河流 森林 动物 植物 海洋 天气 城市 住房 就业 养老 体育 "
           "足球 篮球 围棋 书法 京剧 诗歌 小说 绘画 雕塑 瓷器 丝绸 熊猫 长城 故宫").split()
ADJECTIVES = "重要 复杂 简单 美丽 安静 热闹 快速 缓慢 现代 丰富 有趣 困难 容易 明显 积极 主要 基本 普通 独特 严重 稳定 清楚 优秀 古老 年轻 温暖 寒冷 干净 方便 紧张".split()
ADVERBS = "非常 十分 比较 特别 已经 正在 一直 终于 逐渐 主动 认真 仔细 相当 越来越 始终".split()
CONNECTORS = "因为 所以 但是 而且 虽然 然而 如果 同时 此外 因此 首先 其次 最后 总之 另外 不过".split()
ENGLISH = "AI GPU Python 5G App CEO iPhone Wi-Fi PDF DNA".split()
TEMPLATES = [
    "{time}，{subj}在{place}{verb}{obj}。",
    "{subj}{adv}{verb}{obj}和{obj2}的问题。",
    "{conn}{obj}{adv}{adj}，{subj}还是决定{verb}{obj2}。",
    "据《{place}日报》报道，{num}名{subj}{time}{verb}了当地的{obj}。",
    "{subj}认为，{obj}的发展对{obj2}来说{adv}{adj}。",
    "在{place}，{verb}{obj}已经成为{subj}最关心的话题之一。",
    "{year}年{month}月{day}日，{place}举办了一场关于{obj}的{adj}活动。",
    "“{obj}和{obj2}有什么关系？”{subj}问道。",
    "{subj}用{english}{verb}{obj}，效果{adv}{adj}。",
    "{conn}{subj}{time}去{place}{verb}{obj}，但是{obj2}{adv}{adj}！",
    "这本书介绍了{obj}、{obj2}和{obj3}等方面的知识。",
    "{place}的{obj}{adv}{adj}，吸引了{num}万名{subj}。",
]


def chinese_lines(n: int, seed: int) -> list[str]:
    """`n` lines of one to four generated Chinese sentences (deterministic for a seed)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(1, 4)):
            sentences.append(rng.choice(TEMPLATES).format(
                subj=rng.choice(SUBJECTS), place=rng.choice(PLACES), time=rng.choice(TIMES),
                verb=rng.choice(VERBS), obj=rng.choice(OBJECTS), obj2=rng.choice(OBJECTS),
                obj3=rng.choice(OBJECTS), adj=rng.choice(ADJECTIVES), adv=rng.choice(ADVERBS),
                conn=rng.choice(CONNECTORS), english=rng.choice(ENGLISH), num=rng.randint(2, 999),
                year=rng.randint(1950, 2024), month=rng.randint(1, 12), day=rng.randint(1, 28)))
        lines.append("".join(sentences))
    return lines


# Lines that test the round trip beyond the generated Chinese: spaces, English, unknown characters.
EDGE_LINES = ["  两个空格开头", "结尾有空格  ", "English and 中文 mixed, 3.14!", "tab\t分隔", "生僻字：龘靐齉",
              "emoji 😀 和 ✓", "a", "，。！？"]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def sentencepiece(path: Path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path))


# -- the models every test shares (trained once per module: about a second) ------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tokenizer_tools")


@pytest.fixture(scope="module")
def zh_eval(workdir) -> Path:
    return write_lines(workdir / "zh_eval.txt", chinese_lines(1000, seed=1))


@pytest.fixture(scope="module")
def base_model(workdir) -> Path:
    """Mostly English plus a few Chinese lines: it knows some Chinese characters, few Chinese words."""
    return train_sentencepiece(workdir / "base", vocab_size=800,
                               lines=corpus_lines(800, seed=1) + chinese_lines(20, seed=99), name="base")


@pytest.fixture(scope="module")
def extra_model(workdir) -> Path:
    corpus = write_lines(workdir / "zh_train.txt", chinese_lines(1200, seed=0))
    output = workdir / "zh" / "zh"
    code = train_spm.main(["--input", str(corpus), "--output", str(output), "--vocab-size", "3000",
                           "--threads", "1", "--no-progress"])
    assert code == 0
    return Path(f"{output}.model")


@pytest.fixture(scope="module")
def merged(workdir, base_model, extra_model, zh_eval) -> Path:
    folder = workdir / "merged"
    code = merge_spm.main(["--base", str(base_model), "--extra", str(extra_model), "--output", str(folder),
                           "--check-input", str(zh_eval)])
    assert code == 0
    return folder


# -- train_spm ---------------------------------------------------------------------------------------


def test_train_spm_writes_a_bpe_model_with_llama_settings(extra_model):
    proto = load_sentencepiece_proto(extra_model)
    assert extra_model.with_suffix(".vocab").exists()
    assert len(proto.pieces) == 3000
    assert proto.trainer_spec.model_type == 2  # BPE
    assert proto.trainer_spec.byte_fallback and proto.trainer_spec.split_digits
    assert proto.normalizer_spec.name == "identity"
    assert proto.normalizer_spec.add_dummy_prefix and not proto.normalizer_spec.remove_extra_whitespaces
    assert [p.piece for p in proto.pieces[:3]] == ["<unk>", "<s>", "</s>"]
    assert proto.trainer_spec.character_coverage == pytest.approx(0.9995)
    assert not list(extra_model.parent.glob(".*tmp*")), "temporary files left behind"


def test_train_spm_passes_options_and_reads_jsonl(workdir, capsys):
    lines = chinese_lines(300, seed=5)
    records = [json.dumps({"text": line}, ensure_ascii=False) for line in lines]
    records.insert(0, json.dumps({"text": "很长" * 100}, ensure_ascii=False))  # 600 bytes: over the limit below
    corpus = write_lines(workdir / "options.jsonl", records)
    output = workdir / "options" / "zh"
    code = train_spm.main([
        "--input", str(corpus), "--output", str(output), "--vocab-size", "1000", "--threads", "1",
        "--no-progress", "--input-sentence-size", "200", "--no-shuffle", "--character-coverage", "1.0",
        "--max-sentence-length", "500", "--user-defined-symbols", "<地名>", "<人名>",
        "--spm-option", "max_sentencepiece_length=3", "--no-split-digits",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    # without --shuffle the trainer stops reading once it has its 200 sentences
    read = int(re.search(r"corpus: ([\d,]+) sentences", printed).group(1).replace(",", ""))
    assert 200 <= read < 300 and "1 longer than --max-sentence-length skipped" in printed
    proto = load_sentencepiece_proto(f"{output}.model")
    spec = proto.trainer_spec
    assert (spec.input_sentence_size, spec.shuffle_input_sentence, spec.max_sentence_length) == (200, False, 500)
    assert spec.max_sentencepiece_length == 3 and not spec.split_digits
    assert max(len(p.piece) for p in proto.pieces if p.type == SPM_NORMAL) <= 3
    user_defined = [p.piece for p in proto.pieces if p.type == SPM_USER_DEFINED]
    assert user_defined == ["<地名>", "<人名>"]


def test_train_spm_reports_bad_input_by_file_line_and_field(workdir, capsys):
    corpus = write_lines(workdir / "bad.jsonl", ['{"text": "好"}', '{"content": "坏"}'])
    code = train_spm.main(["--input", str(corpus), "--output", str(workdir / "bad" / "zh"), "--no-progress"])
    error = capsys.readouterr().err
    assert code == 2
    assert f"{corpus}:2: field 'text' is missing" in error
    assert not (workdir / "bad" / "zh.model").exists()
    code = train_spm.main(["--input", str(corpus), "--output", str(workdir / "bad" / "zh"), "--spm-option", "oops"])
    assert code == 2 and "expected key=value" in capsys.readouterr().err


# -- merge_spm: item 1 on a base model trained here ----------------------------------------------


def test_merge_keeps_every_base_piece_at_its_id_with_its_score_and_type(base_model, merged):
    base = load_sentencepiece_proto(base_model)
    result = load_sentencepiece_proto(merged / "tokenizer.model")
    for i, piece in enumerate(base.pieces):
        assert (result.pieces[i].piece, result.pieces[i].score, result.pieces[i].type) == (piece.piece, piece.score, piece.type), i
    assert result.normalizer_spec == base.normalizer_spec
    assert result.trainer_spec == base.trainer_spec


def test_merge_appends_only_new_normal_pieces_in_extra_order_with_strictly_lower_scores(base_model, extra_model, merged):
    base, extra = load_sentencepiece_proto(base_model), load_sentencepiece_proto(extra_model)
    result = load_sentencepiece_proto(merged / "tokenizer.model")
    base_pieces = {p.piece for p in base.pieces}
    expected = [p.piece for p in extra.pieces if p.type == SPM_NORMAL and p.piece not in base_pieces]
    added = list(result.pieces)[len(base.pieces):]
    assert [p.piece for p in added] == expected
    assert len(expected) > 1000, "the test corpus should give the base many pieces it lacks"
    assert all(p.type == SPM_NORMAL for p in added)
    lowest_base = min(p.score for p in base.pieces if p.type == SPM_NORMAL)
    scores = [p.score for p in added]
    assert scores[0] < lowest_base
    assert all(later < earlier for earlier, later in zip(scores, scores[1:])), "new scores must be strictly decreasing"
    assert len({p.piece for p in result.pieces}) == len(result.pieces)


def test_merged_tokenizer_round_trips_text_exactly(merged, zh_eval):
    sp = sentencepiece(merged / "tokenizer.model")
    lines = zh_eval.read_text(encoding="utf-8").splitlines() + corpus_lines(100, seed=3) + EDGE_LINES
    failures = [line for line in lines if sp.Decode(sp.Encode(line)) != line]
    assert failures == []


def test_hf_tokenizer_json_gives_the_sentencepiece_ids(merged, zh_eval):
    """Item 1: at least 99.5% of 1,000 Chinese lines (we get all of them), plus mixed and edge lines."""
    from tokenizers import Tokenizer as HFTokenizer

    sp = sentencepiece(merged / "tokenizer.model")
    hf = HFTokenizer.from_file(str(merged / "tokenizer.json"))
    lines = zh_eval.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1000
    same = sum(hf.encode(line, add_special_tokens=False).ids == sp.Encode(line) for line in lines)
    assert same / len(lines) >= 0.995, f"{same}/{len(lines)}"
    assert same == len(lines)
    for line in EDGE_LINES + corpus_lines(50, seed=4):
        assert hf.encode(line, add_special_tokens=False).ids == sp.Encode(line), line


def test_score_zero_recipe_makes_the_libraries_disagree_where_ordered_scores_agree(workdir, base_model, merged, zh_eval):
    """The common recipe (every new piece score 0) ties thousands of merges: SentencePiece breaks
    ties leftmost-first, `tokenizers` by merge rank, and the two disagree on Chinese lines."""
    proto = load_sentencepiece_proto(merged / "tokenizer.model")
    n_base = len(load_sentencepiece_proto(base_model).pieces)
    for piece in list(proto.pieces)[n_base:]:
        piece.score = 0.0
    merge_spm.write_merged(proto, workdir / "score_zero")
    lines = zh_eval.read_text(encoding="utf-8").splitlines()
    zero_disagree = merge_spm.disagreeing_lines(workdir / "score_zero", lines)
    ordered_disagree = merge_spm.disagreeing_lines(merged, lines)
    assert len(zero_disagree) >= 10, len(zero_disagree)  # 61 of 1000 when written
    assert ordered_disagree == []


def test_new_tokens_are_runs_of_base_tokens(base_model, merged, zh_eval):
    """New scores rank below every base score, so every base merge happens first: the merged
    tokenizer only joins neighbouring base tokens, never splits text where the base would not."""
    base_sp, merged_sp = sentencepiece(base_model), sentencepiece(merged / "tokenizer.model")
    lines = zh_eval.read_text(encoding="utf-8").splitlines()[:300] + corpus_lines(50, seed=6) + EDGE_LINES
    joined = 0
    for line in lines:
        base_ends = {p.end for p in base_sp.Encode(line, return_type="proto").pieces}
        merged_pieces = merged_sp.Encode(line, return_type="proto").pieces
        assert {p.end for p in merged_pieces} <= base_ends, line
        joined += len(base_ends) - len({p.end for p in merged_pieces})
    assert joined > 0


def test_every_new_piece_is_reachable_and_produced_by_its_own_text(base_model, merged):
    """The extra model is BPE, so each new piece's halves are pieces too (appended before it)."""
    proto = load_sentencepiece_proto(merged / "tokenizer.model")
    n_base = len(load_sentencepiece_proto(base_model).pieces)
    assert merge_spm.unreachable_pieces(proto, n_base) == []
    assert merge_spm.pieces_not_produced(proto, n_base) == []
    # the check can fail: drop a half of a new two-piece word and it reports the word
    broken = type(proto)()
    broken.CopyFrom(proto)
    victim = next(p for p in list(broken.pieces)[n_base:] if len(p.piece) == 1 and any(
        len(q.piece) > 1 and p.piece in q.piece for q in list(broken.pieces)[n_base:]))
    victim.type = 5  # UNUSED: no longer a normal piece
    assert merge_spm.unreachable_pieces(broken, n_base)


def test_transformers_loads_the_merged_folder_with_the_same_ids(merged, zh_eval):
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(merged))
    sp = sentencepiece(merged / "tokenizer.model")
    assert len(tokenizer) == sp.GetPieceSize()
    for line in zh_eval.read_text(encoding="utf-8").splitlines()[:200] + EDGE_LINES[:3]:
        assert tokenizer(line, add_special_tokens=False)["input_ids"] == sp.Encode(line), line
    assert tokenizer("你好")["input_ids"][0] == sp.bos_id()


def test_merge_spm_refuses_a_unigram_extra_model(workdir, base_model, capsys):
    import sentencepiece as spm

    corpus = write_lines(workdir / "unigram.txt", chinese_lines(200, seed=7))
    spm.SentencePieceTrainer.Train(input=str(corpus), model_prefix=str(workdir / "unigram"), model_type="unigram",
                                   vocab_size=600, num_threads=1, minloglevel=2)
    code = merge_spm.main(["--base", str(base_model), "--extra", str(workdir / "unigram.model"),
                           "--output", str(workdir / "refused")])
    assert code == 2
    assert f"{workdir / 'unigram.model'}: a unigram model" in capsys.readouterr().err
    assert not (workdir / "refused").exists()


def test_scores_below_stay_distinct_in_float32():
    assert merge_spm.scores_below(-10.0, 3) == [-11.0, -12.0, -13.0]
    # LLaMA-2 gives its whitespace pieces -1e9, where float32 numbers are 64 apart
    assert merge_spm.scores_below(-1e9, 3) == [-1e9 - 64, -1e9 - 128, -1e9 - 192]


# -- compare ---------------------------------------------------------------------------------------


def test_compare_reports_counts_a_hand_count_agrees_with(base_model, merged, zh_eval, capsys):
    code = compare.main(["--tokenizer", str(base_model), "--tokenizer", str(merged), "--tokenizer",
                         str(merged / "tokenizer.json"), "--input", str(zh_eval), "--json", "--no-progress"])
    assert code == 0
    base_stats, merged_stats, hf_stats = json.loads(capsys.readouterr().out)
    lines = zh_eval.read_text(encoding="utf-8").splitlines()
    for stats, model in ((base_stats, base_model), (merged_stats, merged / "tokenizer.model")):
        sp = sentencepiece(model)
        encoded = [sp.Encode(line) for line in lines]
        tokens = sum(map(len, encoded))
        assert stats["vocab_size"] == sp.GetPieceSize()
        assert stats["lines"] == 1000 and stats["tokens"] == tokens
        assert stats["tokens_per_line"] == pytest.approx(tokens / 1000, rel=1e-12)
        assert stats["characters_per_token"] == pytest.approx(sum(map(len, lines)) / tokens, rel=1e-12)
        assert stats["byte_tokens"] == sum(sp.IsByte(i) for ids in encoded for i in ids)
        assert stats["unknown_tokens"] == sum(ids.count(sp.unk_id()) for ids in encoded)
        assert stats["roundtrip_failures"] == 0
        assert stats["lines_per_second"] > 0 and stats["characters_per_second"] > 0
    assert merged_stats["tokens_per_line"] < 0.7 * base_stats["tokens_per_line"]
    assert hf_stats["tokens"] == merged_stats["tokens"]


def test_compare_table_and_errors(base_model, merged, zh_eval, capsys):
    assert compare.main(["--tokenizer", str(base_model), "--tokenizer", str(merged),
                         "--input", str(zh_eval), "--max-lines", "50", "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "50 lines" in table and "tokens/line" in table and str(merged) in table
    assert compare.main(["--tokenizer", str(merged / "missing.model"), "--input", str(zh_eval)]) == 2
    assert "missing.model: tokenizer file not found" in capsys.readouterr().err


def test_tools_run_as_modules():
    for tool in ("train_spm", "merge_spm", "compare"):
        run = subprocess.run([sys.executable, "-m", f"tokenizer_tools.{tool}", "--help"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        assert "usage: python -m tokenizer_tools." + tool in run.stdout


# -- item 2: the real LLaMA-2 tokenizer (skipped where ../shared is absent) -----------------------


def test_merge_into_llama2_keeps_its_pieces_and_shortens_chinese(workdir, llama2_tokenizer_path, extra_model, zh_eval, capsys):
    folder = workdir / "llama2_zh"
    code = merge_spm.main(["--base", str(llama2_tokenizer_path), "--extra", str(extra_model), "--output", str(folder),
                           "--check-input", str(zh_eval)])
    assert code == 0, capsys.readouterr().err
    llama, result = load_sentencepiece_proto(llama2_tokenizer_path), load_sentencepiece_proto(folder / "tokenizer.model")
    assert len(llama.pieces) == 32000 and len(result.pieces) > 32000
    for i in range(32000):
        a, b = llama.pieces[i], result.pieces[i]
        assert (a.piece, a.score, a.type) == (b.piece, b.score, b.type), i
    llama_sp, merged_sp = sentencepiece(llama2_tokenizer_path), sentencepiece(folder / "tokenizer.model")
    lines = zh_eval.read_text(encoding="utf-8").splitlines()
    for line in lines + EDGE_LINES:
        assert merged_sp.Decode(merged_sp.Encode(line)) == line, line
    llama_tokens = sum(len(ids) for ids in llama_sp.Encode(lines)) / len(lines)
    merged_tokens = sum(len(ids) for ids in merged_sp.Encode(lines)) / len(lines)
    assert merged_tokens < 0.5 * llama_tokens, (merged_tokens, llama_tokens)
    assert merge_spm.disagreeing_lines(folder, lines + EDGE_LINES) == []
