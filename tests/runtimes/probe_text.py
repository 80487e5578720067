"""A fixed probe set that needs no downloaded data: queries with candidate passages of search-result length.

The fidelity gate (test_fidelity.py) compares every engine's scores with fp32 on it, beside the DL19 pairs
where those are present. It spans short and long passages, relevant and unrelated ones, numbers, names and
code-like tokens, in several registers. Written for openrerank.
"""

from __future__ import annotations

PROBE_QUERIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("what does a reranker do", (
        "A reranker scores each query and passage pair and sorts the passages best-first.",
        "Bananas are yellow.",
        "Search systems often retrieve a few hundred candidates with a fast method such as BM25 or a vector "
        "index, then pass the best of them to a slower but more accurate model. That second model, the "
        "reranker, reads the query and each candidate together and assigns a relevance score, which is why "
        "it catches matches that share no words with the query.",
    )),
    ("how long should I boil an egg for a soft yolk", (
        "For a soft, jammy yolk, lower the eggs into water that is already boiling and cook them for six to "
        "seven minutes, then move them to a bowl of ice water for two minutes before peeling.",
        "Eggs are a good source of protein, vitamin B12 and choline. One large egg holds about six grams of "
        "protein and seventy calories.",
        "The boiling point of water drops by about one degree Celsius for every three hundred metres of "
        "altitude, so recipes written for sea level need longer cooking times in the mountains.",
    )),
    ("symptoms of vitamin d deficiency", (
        "Vitamin D deficiency often has no symptoms at first. Over months it can cause bone pain, muscle "
        "weakness, fatigue and low mood; in children a severe lack leads to rickets, and in adults to "
        "osteomalacia, a softening of the bones. A blood test for 25-hydroxyvitamin D confirms it.",
        "The skin makes vitamin D when it is exposed to ultraviolet B light from the sun.",
        "Calcium, magnesium and phosphorus are minerals the body needs for strong bones and teeth.",
        "Influenza causes fever, cough, sore throat, muscle aches and fatigue.",
    )),
    ("python list comprehension with condition", (
        "A list comprehension can filter as it builds: [x * 2 for x in values if x > 0] doubles only the "
        "positive numbers. A conditional expression in the output part, [x if x > 0 else 0 for x in values], "
        "keeps every element but replaces the negative ones.",
        "Python was created by Guido van Rossum and first released in 1991.",
        "In JavaScript, Array.prototype.filter returns a new array with the elements that pass a test, and "
        "map returns a new array with each element transformed; chaining them is the usual equivalent of a "
        "filtered comprehension.",
    )),
    ("when did the berlin wall fall", (
        "The Berlin Wall fell on the night of 9 November 1989, when East German authorities unexpectedly "
        "opened the border crossings and crowds streamed through; demolition followed over the next year.",
        "Berlin is the capital and largest city of Germany, with about 3.7 million inhabitants.",
        "The Great Wall of China is a series of fortifications built over many centuries across northern China.",
    )),
    ("average salary of a registered nurse", (
        "Registered nurses in the United States earned a median annual wage of about 86,000 dollars in 2023, "
        "according to the Bureau of Labor Statistics; pay varies widely by state, with California and Hawaii "
        "at the top and several southern states near the bottom.",
        "Nursing programs teach anatomy, pharmacology, patient care and clinical practice.",
        "A nurse shark is a slow-moving shark that rests on the sea floor during the day.",
    )),
    ("how do vaccines train the immune system", (
        "Vaccines expose the immune system to a harmless piece or weakened form of a pathogen, such as a "
        "protein from its surface. B cells learn to make antibodies against it and memory cells remain "
        "afterwards, so a later infection is recognised and stopped quickly, often before symptoms appear. "
        "mRNA vaccines deliver instructions that let the body's own cells make the protein for a short time.",
        "The first vaccine was developed by Edward Jenner in 1796 against smallpox.",
        "Antibiotics kill bacteria or stop them from growing; they do not work against viruses.",
    )),
    ("cheapest way to heat a house", (
        "Heat pumps move heat rather than generate it, delivering three to four units of heat per unit of "
        "electricity, which usually makes them cheaper to run than gas or oil boilers; insulation and draught "
        "proofing cut the bill further whatever the heating system.",
        "The house was built in 1920 and has three bedrooms, a garden and a garage.",
        "Thermal energy flows from warmer objects to colder ones until they reach the same temperature.",
    )),
    ("define photosynthesis", (
        "Photosynthesis is the process by which plants, algae and some bacteria use light energy to turn "
        "carbon dioxide and water into glucose and oxygen. It takes place in the chloroplasts, where the "
        "pigment chlorophyll absorbs mostly red and blue light.",
        "Plants need water, light, air and nutrients from the soil to grow.",
        "Photography is the art of capturing light with a camera to create an image.",
    )),
    ("is it safe to run a marathon without training", (
        "Running a marathon without training raises the risk of muscle injury, stress fractures, "
        "rhabdomyolysis and heat illness; most plans build up over sixteen to twenty weeks, with a weekly "
        "long run that grows to about thirty kilometres.",
        "The marathon distance of 42.195 kilometres was fixed at the 1908 London Olympics.",
        "Walking thirty minutes a day lowers the risk of heart disease, diabetes and depression.",
    )),
    ("what is the capital of australia", (
        "Canberra is the capital city of Australia. It was chosen in 1908 as a compromise between Sydney and "
        "Melbourne, the two largest cities.",
        "Sydney is known for its harbour, the Opera House and the Harbour Bridge.",
        "Austria is a landlocked country in central Europe; its capital is Vienna.",
    )),
    ("difference between tcp and udp", (
        "TCP sets up a connection, numbers every byte, retransmits what is lost and delivers data in order, "
        "at the cost of handshakes and head-of-line blocking. UDP sends independent datagrams with no "
        "delivery or ordering guarantee and no connection state, which suits DNS lookups, voice, games and "
        "protocols like QUIC that build their own reliability on top.",
        "HTTP/3 runs over QUIC, which itself runs over UDP port 443.",
        "A router forwards packets between networks using a routing table.",
    )),
    ("how many calories in a banana", (
        "A medium banana of about 118 grams has roughly 105 calories, 27 grams of carbohydrate, 3 grams of "
        "fibre and 1.3 grams of protein, along with potassium and vitamin B6.",
        "Bananas grow in tropical regions; India is the largest producer in the world.",
        "Bananas are yellow.",
    )),
    ("who wrote pride and prejudice", (
        "Pride and Prejudice is a novel by Jane Austen, published in 1813. It follows Elizabeth Bennet as she "
        "deals with manners, upbringing, morality and marriage in the landed gentry of Regency England.",
        "Charlotte Bronte wrote Jane Eyre, published in 1847 under the pen name Currer Bell.",
        "Prejudice is a preconceived opinion that is not based on reason or actual experience.",
    )),
    ("error: permission denied (publickey) git push", (
        "'Permission denied (publickey)' means the server did not accept any SSH key you offered. Check that "
        "ssh-agent holds your key (ssh-add -l), that the public key is added to your account, and test with "
        "ssh -T git@github.com; if the remote uses HTTPS instead, push with a personal access token.",
        "git push uploads local branch commits to the remote repository.",
        "Public-key cryptography uses a pair of keys: a public key for encryption and a private key for "
        "decryption or signing.",
    )),
    ("causes of the french revolution", (
        "The French Revolution of 1789 grew out of a fiscal crisis after costly wars, a tax system that "
        "spared the nobility and clergy, bad harvests and soaring bread prices, and Enlightenment ideas about "
        "popular sovereignty and equal rights. When Louis XVI summoned the Estates-General, the Third Estate "
        "declared itself a National Assembly, and the storming of the Bastille on 14 July followed.",
        "France is the most visited country in the world, with about ninety million tourists a year.",
        "The American Revolution began in 1775 and ended with the Treaty of Paris in 1783.",
    )),
)
