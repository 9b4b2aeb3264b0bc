"""Answer quality: the knowledge base and the checkers that flag hallucinated or unsafe output."""
