from fmserve.cli import app

app()
