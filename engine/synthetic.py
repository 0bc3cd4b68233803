"""A procedural generator of short children's stories: the corpus the main job trains on
without a download.

Each story picks a hero, a friend, a place, an object and one of several plots, and tells
it in the words of a young child's vocabulary, with dialogue and a small lesson at the end.
Stories depend only on the seed and their index, so any slice can be generated alone.
"""
import random

GIRLS = ["Lily", "Mia", "Sue", "Anna", "Emma", "Lucy", "Sara", "Amy", "Ella", "Zoe", "Rosie", "Kim"]
BOYS = ["Tom", "Ben", "Max", "Sam", "Jack", "Leo", "Tim", "Joe", "Finn", "Bob", "Dan", "Noah"]
ANIMALS = [
    ("a little bunny", "Bunny"), ("a small cat", "Kitty"), ("a brown dog", "Spot"),
    ("a tiny bird", "Tweet"), ("a fluffy bear", "Teddy"), ("a happy duck", "Quack"),
    ("a slow turtle", "Shelly"), ("a baby fox", "Red"), ("a grey mouse", "Squeak"),
    ("a big frog", "Hop"), ("a kind cow", "Moo"), ("a young owl", "Hoot"),
]
# (place, the preposition for being there, what one sees there, a landmark)
PLACES = [
    ("the park", "in", "green grass", "a tall slide"), ("the garden", "in", "pretty flowers", "a big tree"),
    ("the beach", "on", "soft sand", "the blue water"), ("the forest", "in", "tall trees", "a little path"),
    ("the farm", "on", "a red barn", "a muddy pond"), ("the town", "in", "busy shops", "a round fountain"),
    ("the meadow", "in", "yellow flowers", "a small hill"), ("the lake", "by", "cool water", "an old boat"),
    ("the school", "at", "a big yard", "a tall swing"), ("the zoo", "at", "many animals", "a long fence"),
]
FLYING = [("kite", "blue"), ("kite", "red"), ("balloon", "green"), ("paper plane", "white")]
OBJECTS = [
    ("ball", "red"), ("kite", "blue"), ("doll", "soft"), ("toy car", "shiny"), ("book", "old"),
    ("hat", "yellow"), ("balloon", "green"), ("teddy", "brown"), ("boat", "little"),
    ("drum", "loud"), ("crayon", "purple"), ("shell", "pink"), ("cup", "round"), ("block", "wooden"),
]
FOODS = ["a cookie", "an apple", "a sandwich", "some cake", "a banana", "some soup", "a pear", "some bread"]
FEELINGS_GOOD = ["happy", "glad", "proud", "excited", "cheerful"]
FEELINGS_BAD = ["sad", "scared", "worried", "upset", "lonely"]
WEATHER = ["sunny", "warm", "bright", "windy", "cloudy", "cool"]
TIMES = ["One day", "Once upon a time", "One morning", "One sunny day", "Long ago", "One afternoon"]
ACTIVITIES = ["play", "run and jump", "sing songs", "look for bugs", "build a tower", "draw pictures", "dance"]
HELPERS = ["mom", "dad", "grandma", "grandpa", "big sister", "big brother", "teacher"]
MORALS = [
    "It is good to share with friends.", "Being kind makes everyone happy.",
    "It is okay to ask for help.", "Friends help each other.", "Being brave is not so hard.",
    "Saying sorry can fix a lot.", "It is fun to try new things.", "Taking turns is fair.",
]


class _Cast:
    """The characters of one story, with the pronouns to tell it."""

    def __init__(self, rng):
        if rng.random() < 0.7:
            girl = rng.random() < 0.5
            self.name = rng.choice(GIRLS if girl else BOYS)
            self.kind = "girl" if girl else "boy"
            self.intro = f"a little {self.kind} named {self.name}"
        else:
            intro, self.name = rng.choice(ANIMALS)
            girl = rng.random() < 0.5
            self.kind = intro.split()[-1]
            self.intro = f"{intro} named {self.name}"
        self.he, self.him, self.his = ("she", "her", "her") if girl else ("he", "him", "his")
        friend_girl = rng.random() < 0.5
        pool = [n for n in (GIRLS if friend_girl else BOYS) if n != self.name]
        self.friend = rng.choice(pool)
        self.fhe, self.fhim = ("she", "her") if friend_girl else ("he", "him")
        self.helper = rng.choice(HELPERS)


def _cap(s):
    return s[0].upper() + s[1:]


def _lost_toy(rng, c, place, obj):
    where, at, thing1, thing2 = place
    name, color = obj
    hide = rng.choice(["under a bush", "behind " + thing2, "in the tall grass", "under a bench", "near " + thing2])
    return [
        f"{c.name} had a {color} {name}. {_cap(c.he)} loved it very much and took it everywhere.",
        f"~{c.name} went to {where} with {c.his} {name}. {_cap(c.he)} saw {thing1} and {thing2}.",
        f"{c.name} played and played. Then {c.he} looked down. The {name} was gone!",
        f"~{c.name} felt {rng.choice(FEELINGS_BAD)}. \"Where is my {name}?\" {c.he} cried.",
        f"{c.friend} saw {c.him} and came over. \"Do not be sad. I will help you look,\" said {c.friend}.",
        f"They looked {rng.choice(['everywhere', 'high and low', 'all around'])}. At last, {c.friend} found the {name} {hide}.",
        f"\"Thank you, {c.friend}!\" said {c.name}. {_cap(c.he)} gave {c.friend} a big hug.",
    ]


def _sharing(rng, c, place, obj):
    where = place[0]
    name, color = obj
    food = rng.choice(FOODS)
    return [
        f"{c.name} went to {where} with {food} and a {color} {name}.",
        f"{c.friend} was there too, but {c.fhe} had nothing to play with. {_cap(c.fhe)} looked {rng.choice(FEELINGS_BAD)}.",
        f"~{c.name} did not want to share. \"This {name} is mine,\" {c.he} said.",
        f"~Then {c.name} saw that {c.friend} was all alone. {_cap(c.he)} thought about how that must feel.",
        f"\"Do you want to play with my {name}?\" asked {c.name}. \"You can have some of my food too.\"",
        f"~{c.friend} smiled a big smile. \"Yes, please!\" {c.fhe} said.",
        f"They played with the {name} and ate {food} together. It was more fun with two.",
    ]


def _brave(rng, c, place, obj):
    where, at, thing1, thing2 = place
    fear = rng.choice(["the dark", "a big dog", "the loud thunder", "the deep water", "the tall slide", "buzzing bees"])
    return [
        f"{c.name} was afraid of {fear}. Every time {c.he} saw it, {c.he} wanted to run away.",
        f"One {rng.choice(WEATHER)} day, {c.name} and {c.his} {c.helper} went to {where}.",
        f"~\"I do not want to go near {fear},\" said {c.name}. \"I am too {rng.choice(['scared', 'small'])}.\"",
        f"{_cap(c.his)} {c.helper} held {c.his} hand. \"I am here with you. Let us go slowly,\" said {c.his} {c.helper}.",
        f"~{c.name} took a deep breath. {_cap(c.he)} took one small step, then another.",
        f"It was not so bad after all! {c.name} laughed and felt {rng.choice(FEELINGS_GOOD)}.",
        f"~\"I did it!\" said {c.name}. \"I am brave now.\"",
    ]


def _new_friend(rng, c, place, obj):
    where, at, thing1, _ = place
    activity = rng.choice(ACTIVITIES)
    return [
        f"{c.name} went to {where}. {_cap(c.he)} saw {thing1} and many children.",
        f"~{c.name} did not know anyone there. {_cap(c.he)} sat down and felt {rng.choice(FEELINGS_BAD)}.",
        f"Then a {rng.choice(['girl', 'boy'])} walked up to {c.him}. \"Hi, I am {c.friend}. Do you want to {activity}?\"",
        f"~{c.name} was shy, but {c.he} said, \"Yes, I want to {activity}!\"",
        f"{c.name} and {c.friend} liked to {activity} all day long.",
        f"~When it was time to go home, {c.friend} said, \"Will you come back tomorrow?\"",
        f"\"Yes!\" said {c.name}. {_cap(c.he)} was so {rng.choice(FEELINGS_GOOD)} to have a new friend.",
    ]


def _mistake(rng, c, place, obj):
    name, color = obj
    return [
        f"{c.name} and {c.friend} were playing with a {color} {name} at home.",
        f"{c.name} wanted the {name} all to {c.him}self. {_cap(c.he)} pulled it too hard.",
        f"Oh no! The {name} broke. {c.friend} started to cry.",
        f"~{c.name} felt bad. {_cap(c.he)} knew {c.he} had made a mistake.",
        f"~{_cap(c.his)} {c.helper} said, \"When we hurt a friend, we can say sorry and try to fix it.\"",
        f"\"I am sorry, {c.friend},\" said {c.name}. They fixed the {name} with some tape.",
        f"~{c.friend} smiled. \"It is okay. Let us play together and take turns.\"",
    ]


def _weather(rng, c, place, obj):
    where, at, thing1, thing2 = place
    name, color = rng.choice(FLYING)
    return [
        f"It was a {rng.choice(WEATHER)} day. {c.name} wanted to go to {where} to fly {c.his} {color} {name}.",
        "But then the sky got dark. Big drops of rain began to fall.",
        f"~\"Oh no, now I cannot play outside,\" said {c.name}. {_cap(c.he)} was {rng.choice(FEELINGS_BAD)}.",
        f"{_cap(c.his)} {c.helper} had an idea. \"We can make a tent inside and read a book.\"",
        f"~They made a tent with blankets and chairs. They read a story and ate {rng.choice(FOODS)}.",
        f"Soon the rain stopped and the sun came out. There was a rainbow over {thing2}!",
        f"~{c.name} ran outside with {c.his} {name}. It was the best day after all.",
    ]


def _helping(rng, c, place, obj):
    where, at, thing1, thing2 = place
    animal, pet = rng.choice(ANIMALS)
    return [
        f"{c.name} was walking {at} {where} when {c.he} heard a small sound.",
        f"It was {animal}. It was stuck near {thing2} and could not get out.",
        f"~\"Do not worry, little one. I will help you,\" said {c.name}.",
        f"{c.name} tried and tried, but {c.he} was too small. So {c.he} ran to get {c.friend}.",
        "Together they pulled very gently. At last, the animal was free!",
        f"~The animal was so {rng.choice(FEELINGS_GOOD)}. It jumped around and then came back to say thank you.",
        f"{c.name} and {c.friend} named it {pet}. After that, {pet} came to play with them every day.",
    ]


def _birthday(rng, c, place, obj):
    name, color = obj
    food = rng.choice(["a big cake", "sweet cupcakes", "a pie", "cookies"])
    return [
        f"Today was {c.friend}'s birthday. {c.name} wanted to give {c.fhim} a present.",
        f"~{c.name} had no money, so {c.he} thought hard. Then {c.he} had an idea.",
        f"{_cap(c.he)} made a card with a {color} {name} on it and wrote \"Happy birthday\" in big letters.",
        f"~At the party there was {food}, balloons and music. Everyone sang and danced.",
        f"{c.name} gave {c.friend} the card. {c.friend} looked at it for a long time.",
        f"\"This is the best present,\" said {c.friend}. \"You made it just for me!\"",
        f"~{c.name} felt warm inside. A gift made with love is a very good gift.",
    ]


PLOTS = [_lost_toy, _sharing, _brave, _new_friend, _mistake, _weather, _helping, _birthday]


def story(seed, index):
    """Story number `index` of the corpus drawn with `seed`."""
    rng = random.Random(seed * 1_000_003 + index)
    c = _Cast(rng)
    place = rng.choice(PLACES)
    obj = rng.choice(OBJECTS)
    plot = rng.choice(PLOTS)
    opening = f"{rng.choice(TIMES)}, there was {c.intro}."
    if rng.random() < 0.5:
        opening += f" {_cap(c.he)} liked to {rng.choice(ACTIVITIES)} with {c.his} friend {c.friend}."
    # Lines marked "~" can be left out without breaking the plot: a shorter telling.
    short = rng.random() < 0.4
    body = [line.lstrip("~") for line in plot(rng, c, place, obj) if not (short and line[0] == "~" and rng.random() < 0.7)]
    ending = rng.choice([
        f"From that day on, {c.name} and {c.friend} were best friends.",
        f"{c.name} learned something that day. {rng.choice(MORALS)}",
        f"That night, {c.name} went to bed with a smile.",
        rng.choice(MORALS),
        "The end.",
    ])
    paragraphs = [" ".join([opening, *body[:3]]), " ".join(body[3:]), ending]
    return "\n\n".join(paragraphs)


def stories(seed, count):
    return [story(seed, i) for i in range(count)]
