"""The fault lab: candidate processes, the fenced resource, the checker of
properties P1-P8 and L1-L5, and the randomized runner
(``python -m electfsm.chaos --seed N``)."""
