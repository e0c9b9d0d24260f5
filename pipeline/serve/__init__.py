"""`diffret serve`: a local web page over a collection (app.py: the ASGI app; media.py: opaque ids,
byte ranges; thumbs.py: decoded JPEG moments; server.py: binding and uvicorn; static/: the page;
browser.py: driving it in headless Chromium, for the test and the docs' screenshot)."""
