"""`road-export serve`: many adapters over one base, behind OpenAI's API on Ray Serve.

engine   continuous batching over one onnxruntime session (torch-free, Ray-free)
loop     the engine's step loop on a thread, outputs delivered to asyncio
text     the model directory's tokenizer and chat template (tokenizers, jinja2), incremental detokenizing
protocol OpenAI's completions / chat completions requests, responses, streaming chunks and errors
http     the FastAPI app
app      the Ray Serve deployment and its metrics (imports Ray)
cli      the `road-export serve` command (imports Ray when run)
example  a tiny multi-tenant model directory built offline (tests, benchmark; needs torch and peft)
"""
