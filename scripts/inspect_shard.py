"""Print a readable summary of one shard: metadata, tensor shapes, a few decoded responses with
their rewards and advantages, EOS stops, entropy and log q statistics.

    python scripts/inspect_shard.py results/rollouts/E/shard_000.safetensors --policy results/policy
"""
import argparse


from entropy_probe.shard_report import summarize_shard  # noqa: E402
from entropy_probe.stage import stage_run  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shard", help="a .safetensors shard written by the workflow")
    parser.add_argument("--policy", help="policy directory whose tokenizer decodes the tokens (else raw ids)")
    parser.add_argument("-n", type=int, default=4, help="number of responses to show (default 4)")
    args = parser.parse_args(argv)
    with stage_run():
        tokenizer = None
        if args.policy:
            from entropy_probe.models import load_tokenizer

            tokenizer = load_tokenizer(args.policy)
        print(summarize_shard(args.shard, tokenizer, args.n), end="")


if __name__ == "__main__":
    main()
