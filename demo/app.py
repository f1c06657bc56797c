"""Streamlit script of the demo page (run through server.py by `dilseg demo`; AppTest loads it directly)."""

from dilseg.demo.page import main

main()
