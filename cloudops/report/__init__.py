"""The cloud report (``cloud.report``): one self-contained HTML page of the cloud as it is and as it was.

``facts`` reads the hosts and the state store, ``imbalance`` keeps the planner's objective over
time, ``graphs`` embeds Graphite's render API images, ``page`` renders the template
``templates/report/cloud.html.j2``.
"""
