"""The OpenAI-compatible HTTP API (FastAPI + uvicorn) over the gRPC server's `AsyncLLM`.

`app.py` builds the FastAPI app and runs uvicorn on a socket bound before the model loads;
`protocol.py` holds the pydantic request models; `errors.py` OpenAI's error shape;
`serving.py` admission, sampling parameters and streams that abort on disconnect;
`completions.py`, `chat.py` and `responses.py` the three generation endpoints;
`tool_parsers.py` and `reasoning.py` pull tool calls and `<think>` text out of completions."""
