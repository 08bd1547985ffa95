"""Split a py-spy profile of `mtbert serve` into where the time goes, per request stage.

Record a running server under load (py-spy is a separate tool: `pip install py-spy`), then split:

    py-spy record -r 250 -f raw --threads -o serve.txt -p SERVER_PID    # while bench/load_test.py --url runs
    python bench/serve_profile_split.py serve.txt [--requests N --rate 250]   # N: requests sent while recording

Each sample is put in the first category whose marker occurs in its stack (most specific first):
the worker thread (tokenisation, model forward, outputs) and the event loop thread (HTTP, JSON,
pydantic validation, response building, batching, idle). Percentages are of all samples of both
threads; a thread's samples over (seconds x rate) is how busy it was. py-spy sees Python frames
only: torch's intra-op threads show up as the worker's "model forward".
"""
import collections

RULES = [  # (category, substring in the stack), the first match wins: most specific first
    ("worker: truncation_flags (2nd tokenisation)", "truncation_flags"),
    ("worker: tokenisation (encode_dataset)", "encode_dataset"),
    ("worker: collate/pad", "collate"),
    ("worker: collate/pad", "(mtbert/data/readers.py"),
    ("worker: model forward (encoder, heads)", "_call_impl"),
    ("worker: predict outputs (kind.predict/probs, numpy)", "predict_dataset"),
    ("worker: predict outputs (kind.predict/probs, numpy)", "predict_datasets"),
    ("worker: predictor other", "Predictor."),
    ("worker: thread pool wait/hand-off", "mtbert-predict"),
    ("loop: idle (epoll select)", "EpollSelector.select"),
    ("loop: JSON parse of request (StrictJSONRequest)", "StrictJSONRequest.json"),
    ("loop: pydantic request validation", "request_body_to_args"),
    ("loop: pydantic request validation", "_validate_value_with_model_field"),
    ("loop: pydantic request validation", "solve_dependencies"),
    ("loop: response validation + JSON (serialize_response, render)", "serialize_response"),
    ("loop: response validation + JSON (serialize_response, render)", "JSONResponse.render"),
    ("loop: response validation + JSON (serialize_response, render)", "jsonable_encoder"),
    ("loop: route handler (check_items, futures, response models)", "create_app.<locals>."),
    ("loop: batching (drain/answer, slicing, executor hand-off)", "ModelService"),
    ("loop: write response to socket", "_SelectorSocketTransport.write"),
    ("loop: read request from socket", "_read_ready"),
    ("loop: BodyLimit middleware", "BodyLimit"),
    ("loop: TrustedHost middleware", "TrustedHostMiddleware"),
    ("loop: HTTP parse/format (h11 library)", "(h11/"),
    ("loop: starlette/fastapi other", "starlette"),
    ("loop: starlette/fastapi other", "fastapi"),
    ("loop: uvicorn protocol other", "uvicorn"),
    ("loop: asyncio event loop other", "asyncio"),
]


def main(path: str, requests: int = 0, rate: float = 250) -> None:
    counts, threads = collections.Counter(), collections.Counter()
    for line in open(path):
        stack, _, n = line.rstrip().rpartition(" ")
        n = int(n)
        thread = stack.split(";")[0]
        threads[thread.split(":")[-1].strip()] += n
        cat = next((c for c, s in RULES if s in stack), "other: " + stack.split(";")[-1][:80])
        counts[cat] += n
    total = sum(counts.values())
    print(f"{total} samples; per thread: " + ", ".join(f"{t} {v}" for t, v in threads.most_common()))
    for c, v in counts.most_common(30):
        per_request = f"  {v / rate / requests * 1000:7.2f} ms/request" if requests else ""
        print(f"{100 * v / total:5.1f}%  {v:6d}{per_request}  {c}")


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("profile", help="py-spy raw output (record -f raw --threads)")
    ap.add_argument("--requests", type=int, default=0, help="requests sent while recording: ms per request")
    ap.add_argument("--rate", type=float, default=250, help="py-spy's sampling rate (-r)")
    args = ap.parse_args()
    main(args.profile, args.requests, args.rate)
