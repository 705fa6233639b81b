"""What the paper does not have: ``fidelity`` (how well previews rank a group as its final rewards do, and the
audit that measures it during training) and ``adaptive`` (prune points moved to where the audit shows faithful
previews). It imports the algorithm only.
"""
