"""A simulated user for LoRA training (scripts/bench_train.py, tests/test_train.py): someone who
rates highly answers of one distinctive, checkable style. Every answer opens with "In short:",
gives one plain sentence, and closes with "That's the gist." A model that has learned the style
starts its answers to new questions with "In short:".
"""

from __future__ import annotations

import random

OPENING, CLOSING = "In short:", "That's the gist."

# topic -> one plain sentence about it (written for this file)
FACTS = {
    "a volcano": "a volcano is an opening in the ground where molten rock, ash and gas escape",
    "photosynthesis": "plants turn light, water and carbon dioxide into sugar and oxygen",
    "a glacier": "a glacier is a slow river of ice that forms where snow piles up for years",
    "the moon": "the moon is the rock that circles the Earth about once a month",
    "a rainbow": "sunlight bends and splits inside raindrops into its colours",
    "inflation": "inflation means prices rise over time, so money buys less",
    "a vaccine": "a vaccine trains the immune system to recognise a germ before it meets it",
    "gravity": "gravity is the pull that masses have on each other",
    "a compass": "a compass needle is a small magnet that points to magnetic north",
    "an earthquake": "an earthquake is the ground shaking when rocks slip along a fault",
    "a battery": "a battery stores energy as chemicals and releases it as electricity",
    "the heart": "the heart is a muscle that pumps blood around the body",
    "a lighthouse": "a lighthouse is a tower with a bright lamp that guides ships",
    "a bridge": "a bridge carries a road or path over water or a valley",
    "the internet": "the internet is a network of computers that pass messages to each other",
    "a thermometer": "a thermometer measures how hot or cold something is",
    "a tide": "tides are the rise and fall of the sea, pulled by the moon",
    "a desert": "a desert is land that gets very little rain",
    "a microscope": "a microscope uses lenses to make tiny things look large",
    "the stomach": "the stomach breaks food down with acid and muscle",
    "a satellite": "a satellite is an object that circles a planet",
    "a hurricane": "a hurricane is a huge spinning storm that forms over warm sea",
    "a password": "a password is a secret word that proves who you are to a computer",
    "the ozone layer": "the ozone layer is a band of gas high up that blocks much ultraviolet light",
    "a seed": "a seed is a baby plant packed with food, waiting to grow",
    "a fossil": "a fossil is the trace of an ancient living thing kept in rock",
    "a budget": "a budget is a plan for what money comes in and goes out",
    "an echo": "an echo is sound bouncing back from a hard surface",
    "a magnet": "a magnet pulls iron and has a north and a south pole",
    "the skeleton": "the skeleton is the frame of bones that holds the body up",
    "a library": "a library is a place that lends books and other media",
    "a comet": "a comet is a ball of ice and dust that grows a tail near the sun",
    "rust": "rust forms when iron meets water and oxygen",
    "a calendar": "a calendar divides time into days, weeks and months",
    "a recipe": "a recipe lists the ingredients and steps to cook a dish",
    "a river delta": "a delta is land built from mud where a river meets the sea",
    "a coral reef": "a coral reef is built by tiny animals in warm, shallow sea",
    "a telescope": "a telescope gathers light to show faraway things",
    "the lungs": "the lungs take in air and pass oxygen into the blood",
    "a cloud": "a cloud is a mass of tiny water droplets floating in the air",
    "an election": "an election is how people choose their leaders by voting",
    "a museum": "a museum keeps and shows objects of art, history or science",
    "a windmill": "a windmill turns the force of the wind into useful work",
    "a map": "a map is a drawing of a place seen from above",
    "a spider web": "a spider web is a net of silk that catches insects",
    "a clock": "a clock measures and shows the time of day",
    "a forest": "a forest is a large area covered mostly by trees",
    "snow": "snow is water vapour frozen into ice crystals that fall from clouds",
    "a volcano island": "a volcano island grows from lava piling up on the sea floor",
    "an orchestra": "an orchestra is a large group of musicians playing together",
    "the brain": "the brain controls the body and does the thinking",
    "a loan": "a loan is money borrowed that must be paid back, usually with interest",
    "a tornado": "a tornado is a narrow, violent column of spinning air",
    "a solar panel": "a solar panel turns sunlight into electricity",
    "the equator": "the equator is the line around the middle of the Earth",
    "a canal": "a canal is a waterway dug by people for boats or water",
    "a honeybee": "a honeybee collects nectar and makes honey in a hive",
    "a diamond": "a diamond is carbon squeezed into a very hard crystal",
    "a dictionary": "a dictionary lists words with their meanings",
    "a wave": "a wave is energy moving through water or air",
    "a passport": "a passport is a document that lets you travel between countries",
    "the liver": "the liver cleans the blood and helps digest food",
    "a kite": "a kite is a light frame with cloth that flies on the wind",
    "a thunderstorm": "a thunderstorm is a storm with lightning and thunder",
    "a question mark": "a question mark ends a sentence that asks something",
    "a hospital": "a hospital is where sick or hurt people are treated",
    "a recipe book": "a recipe book collects many recipes in one place",
    "a skyscraper": "a skyscraper is a very tall building with many floors",
    "a planet": "a planet is a large body that circles a star",
    "a tsunami": "a tsunami is a giant sea wave set off by an undersea quake",
    "a fever": "a fever is a body temperature above normal, often from an infection",
    "a shadow": "a shadow is the dark shape where an object blocks light",
    "an oasis": "an oasis is a green spot in a desert where water reaches the surface",
    "a drum": "a drum makes sound when its stretched skin is struck",
    "a vote": "a vote is one person's choice in a decision made by many",
    "a spreadsheet": "a spreadsheet is a grid of cells for numbers and formulas",
    "a harbour": "a harbour is sheltered water where ships can stay safe",
    "chocolate": "chocolate is made from roasted cocoa beans and sugar",
    "a rocket": "a rocket flies by pushing hot gas out of its back",
    "an island": "an island is land with water all around it",
}

QUESTIONS = ("What is {t}?", "Can you explain {t}?", "Tell me about {t}.", "How would you describe {t}?",
             "What should I know about {t}?")


def answer(fact: str) -> str:
    return f"{OPENING} {fact[0].upper()}{fact[1:]}. {CLOSING}"


def exchanges(n: int | None = None, seed: int = 0, topics: list[str] | None = None) -> list[dict[str, str]]:
    """``n`` (default: one per topic) rated exchanges in the persona's style, in a fixed shuffled
    order: each topic once before any comes again, asked in another words the next time (up to
    five times a topic). ``topics``: only these."""
    rng = random.Random(seed)
    chosen = list(topics or FACTS)
    rng.shuffle(chosen)
    items = [{"question": QUESTIONS[(round_ + hash_) % len(QUESTIONS)].format(t=topic), "answer": answer(FACTS[topic]),
              "topic": topic}
             for round_ in range(len(QUESTIONS)) for hash_, topic in enumerate(chosen)]
    return items[:n or len(chosen)]


def split_topics(held_out: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(training topics, held-out topics): questions on held-out topics are new to the model."""
    topics = sorted(FACTS)
    random.Random(seed).shuffle(topics)
    return topics[held_out:], topics[:held_out]


def shows_style(text: str) -> bool:
    """Whether a generated answer is in the persona's style (it opens the way the user likes)."""
    return text.strip().lower().startswith(OPENING.lower())
