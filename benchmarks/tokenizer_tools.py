"""The vocabulary-extension path end to end, timed: train_spm -> merge_spm -> compare.

    python benchmarks/tokenizer_tools.py [--base ../shared/data/llama2_tokenizer.model] [--workdir /tmp/zh_vocab]

Nothing is downloaded: the Chinese text is generated here, deterministically, from word lists and
sentence patterns of several registers (news, encyclopaedia, how-to, dialogue), with numbers, dates,
quotation marks, book titles and a little English, so it looks like web text. Generated text is more
repetitive than real text, so its token savings are larger than on real corpora (BELLE measured
733 -> 291 tokens a line, 0.40x, with a 79k vocabulary on real data).

Each tool runs as users run it (`python -m tokenizer_tools.X`), and its wall-clock time is printed
with its output.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nanotune.tokenizer import load_sentencepiece_proto  # noqa: E402

PEOPLE = ("学生 老师 医生 护士 工程师 程序员 农民 工人 科学家 记者 作家 诗人 画家 音乐家 演员 导演 运动员 教练 律师 法官 警察 "
          "司机 厨师 商人 企业家 经理 员工 志愿者 专家 学者 教授 研究人员 设计师 建筑师 会计 销售员 快递员 外卖员 村民 居民 游客 "
          "消费者 读者 观众 网友 家长 孩子 老人 年轻人 大学生 研究生 博士 院士 市长 代表 委员 领导 干部 工作人员").split()
PLACES = ("北京 上海 广州 深圳 杭州 成都 西安 南京 武汉 重庆 天津 苏州 长沙 昆明 青岛 大连 厦门 哈尔滨 沈阳 郑州 济南 合肥 福州 "
          "南昌 贵阳 南宁 兰州 银川 西宁 拉萨 乌鲁木齐 呼和浩特 石家庄 太原 海口 三亚 桂林 丽江 大理 敦煌 洛阳 开封 扬州 绍兴 "
          "宁波 温州 无锡 珠海 香港 澳门 台北 云南 四川 广东 浙江 江苏 山东 河南 湖北 湖南 福建 江西 安徽 河北 山西 陕西 甘肃 "
          "新疆 西藏 内蒙古 黑龙江 吉林 辽宁 海南 贵州 广西 宁夏 青海").split()
ORGS = "公司 政府 学校 医院 大学 研究所 实验室 博物馆 图书馆 银行 工厂 农场 社区 协会 基金会 出版社 电视台 报社 法院 委员会 合作社 中心".split()
TOPIC_MODIFIERS = "城市 农村 社区 数字 绿色 智能 传统 现代 国际 地方 基础 公共 海洋 高速 新能源 人工 医疗 文化 教育 金融 网络 移动 家庭 青少年 老年".split()
TOPIC_HEADS = ("经济 交通 教育 医疗 服务 产业 技术 安全 环境 建设 治理 消费 市场 平台 系统 工程 政策 资源 设施 保障 管理 创新 研究 "
               "发展 改革 合作 贸易 投资 旅游 农业 工业 能源 电力 通信 物流 住房 就业 养老 卫生 体育 艺术 文学 音乐 电影 游戏 "
               "数据 软件 芯片 汽车 电池 手机 电脑 网站 应用 模型 算法 机器人 卫星 火箭 桥梁 铁路 公路 机场 港口 水库 森林 草原 "
               "河流 湖泊 山脉 气候 天气 空气 土壤 植物 动物 熊猫 茶叶 丝绸 瓷器 书法 绘画 京剧 诗歌 小说 历史 哲学 法律 语言").split()
VERBS = ("研究 讨论 发展 建设 学习 介绍 参观 访问 提高 改善 解决 分析 设计 制造 生产 销售 购买 使用 保护 支持 组织 参加 举办 完成 "
         "开始 推动 促进 加强 关注 了解 认识 发现 创造 管理 服务 培养 报道 准备 选择 调查 评估 规划 投资 探索 记录 整理 翻译 推广 "
         "宣传 落实 完善 优化 升级 引进 开发 测试 发布 更新 维护 修复 改造 扩大 减少 控制 预防 应对 处理 协调 监督 检查 审批 "
         "申请 提交 签署 实施 执行 启动 建立 设立 成立 举行 召开 出席 主持 发表 提出 表示 强调 指出 认为 希望 呼吁 建议").split()
ADJECTIVES = ("重要 复杂 简单 美丽 安静 热闹 快速 缓慢 现代 丰富 有趣 困难 容易 明显 积极 主要 基本 普通 独特 严重 稳定 清楚 优秀 "
              "古老 年轻 温暖 寒冷 干净 方便 紧张 显著 广泛 深刻 持续 全面 有效 合理 科学 先进 可靠 灵活 便宜 昂贵 舒适 健康 安全").split()
ADVERBS = "非常 十分 比较 特别 已经 正在 一直 终于 逐渐 主动 认真 仔细 相当 越来越 始终 进一步 不断 明显 大幅 基本 几乎 尤其 同样 依然".split()
CONNECTORS = "因为 所以 但是 而且 虽然 然而 如果 同时 此外 因此 首先 其次 最后 总之 另外 不过 例如 事实上 一方面 另一方面 与此同时 总的来说".split()
TIMES = ("今天 昨天 明天 去年 今年 明年 上午 下午 早上 晚上 周末 春天 夏天 秋天 冬天 最近 过去 将来 近年来 目前 当时 此前 "
         "上个月 下个月 本周 上周 今年上半年 去年同期 未来五年").split()
UNITS = "个 家 名 位 项 件 座 条 种 次 台 辆 所 篇 部 本 亿元 万元 公里 吨 平方米 千瓦 个百分点".split()
ENGLISH = "AI GPU CPU Python Java 5G App CEO iPhone Android Wi-Fi PDF DNA GDP CPI ChatGPT NBA WTO USB HTML".split()
DIALOGUE = ["你好，请问{place}怎么走？", "我觉得{topic}这个问题{adv}{adj}。", "你知道{topic}吗？", "谢谢你的帮助！",
            "没关系，我们明天再讨论{topic}吧。", "这个{topic}多少钱？", "{person}说：“{topic}{adv}{adj}。”",
            "请问您对{topic}有什么看法？", "我完全同意你的观点。", "哈哈，太{adj}了！", "好的，我马上去{verb}。"]
NEWS = [
    "{time}，{place}{org}{verb}了{topic}工作会议，{number}{unit}{topic}项目正式{verb}。",
    "据《{place}日报》报道，{time}{place}共有{number}{unit}{person}参加了{topic}活动。",
    "{place}{org}发言人表示，{topic}{adv}{adj}，下一步将{verb}{topic}。",
    "{year}年{month}月{day}日，{place}{verb}了首个{topic}示范区，总投资{number}亿元。",
    "数据显示，{time}{place}{topic}增长{percent}%，{adv}高于全国平均水平。",
    "{person}{name}在接受记者采访时指出，{topic}是{topic2}的关键。",
    "会议强调，要{adv}{verb}{topic}，{verb2}{topic2}，推动{topic3}高质量发展。",
]
ENCYCLOPEDIA = [
    "{topic}是指{topic2}中{adj}的一部分，最早出现在{year}年前后。",
    "{place}位于中国{direction}部，是{adj}的{topic}城市，人口约{number}万。",
    "{topic}主要包括{topic2}、{topic3}和{topic4}等方面。",
    "根据{org}的统计，{topic}在{year}年达到{number}{unit}，{adv}超过了{topic2}。",
    "在{place}，{topic}有着{adj}的历史，当地{person}{adv}重视{topic2}。",
    "《{topic}{book}》是{name}于{year}年出版的作品，共{number}章。",
]
HOWTO = [
    "第{step}步：打开{english}，点击“{topic}”按钮，然后选择“{topic2}”。",
    "如果{topic}出现问题，请先检查{topic2}是否{adj}。",
    "使用{english}{verb}{topic}时，需要注意以下{step}点：",
    "{connector}，建议每天{verb}{topic}至少{number}分钟。",
    "注意：{topic}不能和{topic2}一起使用，否则可能影响{topic3}。",
]
OPINION = [
    "{connector}，{topic}{adv}{adj}，但是{person}{adv}{verb}{topic2}。",
    "我认为{topic}的发展对{topic2}来说{adv}{adj}。",
    "很多{person}都觉得{topic}{adv}{adj}，{connector}{topic2}也需要{verb}。",
    "{connector}，如果没有{topic}，{person}就很难{verb}{topic2}。",
    "为什么{topic}会变得{adv}{adj}？原因有很多。",
]
SURNAMES = "王 李 张 刘 陈 杨 黄 赵 吴 周 徐 孙 马 朱 胡 郭 何 高 林 罗 郑 梁 谢 宋 唐 许 韩 冯 邓 曹 彭 曾 肖 田 董 袁 潘 于 蒋 蔡".split()
GIVEN = "伟 芳 娜 敏 静 丽 强 磊 军 洋 勇 艳 杰 娟 涛 明 超 秀 霞 平 刚 桂 文 华 建 国 红 玉 兰 英 海 志 鹏 宇 欣 怡 浩 然 晨 雪".split()
BOOKS = "概论 简史 研究 手册 指南 导论 故事 笔记 之路 与未来".split()
DIRECTIONS = "东 南 西 北 东南 西南 东北 西北 中".split()


def _topic(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice(TOPIC_HEADS)
    return rng.choice(TOPIC_MODIFIERS) + rng.choice(TOPIC_HEADS)


def _sentence(rng: random.Random, pattern: str) -> str:
    return pattern.format(
        person=rng.choice(PEOPLE), place=rng.choice(PLACES), org=rng.choice(ORGS),
        topic=_topic(rng), topic2=_topic(rng), topic3=_topic(rng), topic4=_topic(rng),
        verb=rng.choice(VERBS), verb2=rng.choice(VERBS), adj=rng.choice(ADJECTIVES), adv=rng.choice(ADVERBS),
        connector=rng.choice(CONNECTORS), time=rng.choice(TIMES), unit=rng.choice(UNITS),
        english=rng.choice(ENGLISH), number=rng.choice([rng.randint(2, 99), rng.randint(100, 9999)]),
        percent=f"{rng.uniform(0.1, 30):.1f}", year=rng.randint(1900, 2024), month=rng.randint(1, 12),
        day=rng.randint(1, 28), step=rng.randint(1, 9), direction=rng.choice(DIRECTIONS),
        name=rng.choice(SURNAMES) + "".join(rng.choices(GIVEN, k=rng.randint(1, 2))), book=rng.choice(BOOKS),
    )


def chinese_text(n_lines: int, seed: int) -> list[str]:
    """`n_lines` paragraphs: each a register (news, encyclopaedia, how-to, opinion, dialogue) and
    one to six sentences of it."""
    rng = random.Random(seed)
    registers = [NEWS, ENCYCLOPEDIA, HOWTO, OPINION, DIALOGUE]
    lines = []
    for _ in range(n_lines):
        patterns = rng.choices(registers, weights=[4, 3, 1, 2, 1])[0]
        lines.append("".join(_sentence(rng, rng.choice(patterns)) for _ in range(rng.randint(1, 6))))
    return lines


def run_tool(args: list[str]) -> float:
    """Run `python -m tokenizer_tools...` as a user would; print its output; return its wall time."""
    print(f"\n$ python -m {' '.join(args)}", flush=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, text=True, capture_output=True)
    seconds = time.perf_counter() - start
    print(done.stdout.rstrip())
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        raise SystemExit(f"{args[0]} failed with exit status {done.returncode}")
    print(f"[{args[0]}: {seconds:.1f} s wall-clock]")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=ROOT.parent / "shared" / "data" / "llama2_tokenizer.model")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/nanotune_zh_vocab"))
    parser.add_argument("--train-lines", type=int, default=40000)
    parser.add_argument("--eval-lines", type=int, default=2000)
    parser.add_argument("--vocab-size", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not args.base.exists():
        raise SystemExit(f"{args.base}: base tokenizer not found (pass --base)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    train_file, eval_file = args.workdir / "zh_train.txt", args.workdir / "zh_eval.txt"
    train_file.write_text("\n".join(chinese_text(args.train_lines, seed=0)) + "\n", encoding="utf-8")
    eval_file.write_text("\n".join(chinese_text(args.eval_lines, seed=1)) + "\n", encoding="utf-8")
    print(f"generated {args.train_lines} training lines and {args.eval_lines} evaluation lines in {args.workdir}")
    print("example:", eval_file.read_text(encoding="utf-8").splitlines()[0])

    times = {
        "train_spm": run_tool(["tokenizer_tools.train_spm", "--input", str(train_file), "--output",
                               str(args.workdir / "zh"), "--vocab-size", str(args.vocab_size),
                               "--threads", str(args.threads), "--no-progress"]),
        "merge_spm": run_tool(["tokenizer_tools.merge_spm", "--base", str(args.base), "--extra",
                               str(args.workdir / "zh.model"), "--output", str(args.workdir / "merged"),
                               "--check-input", str(eval_file)]),
        "compare": run_tool(["tokenizer_tools.compare", "--tokenizer", str(args.base), "--tokenizer",
                             str(args.workdir / "merged"), "--tokenizer", str(args.workdir / "merged" / "tokenizer.json"),
                             "--input", str(eval_file), "--no-progress"]),
    }
    print("\n" + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in times.items()))
    score_zero_check(args.workdir / "merged", len(load_sentencepiece_proto(args.base).pieces), eval_file)


def score_zero_check(merged: Path, n_base: int, eval_file: Path) -> None:
    """The common recipe for comparison: every new piece score 0. Count the lines on which
    SentencePiece and the converted tokenizer.json then disagree (ties broken differently)."""
    from tokenizer_tools.merge_spm import disagreeing_lines, write_merged

    proto = load_sentencepiece_proto(merged / "tokenizer.model")
    for piece in list(proto.pieces)[n_base:]:
        piece.score = 0.0
    write_merged(proto, merged.parent / "merged_score_zero")
    lines = [line for line in eval_file.read_text(encoding="utf-8").splitlines() if line]
    ours = disagreeing_lines(merged, lines)
    zero = disagreeing_lines(merged.parent / "merged_score_zero", lines)
    print(f"sentencepiece vs tokenizer.json on {len(lines)} lines: {len(ours)} differ with merge_spm's scores, "
          f"{len(zero)} differ with every new score 0")


if __name__ == "__main__":
    main()
