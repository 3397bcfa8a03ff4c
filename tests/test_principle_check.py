"""The principle check: a real language identifier on labelled short texts, regexes, the default
check of the bundled principle, and the config's mistakes."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from iq_lightning.errors import ConfigError
from iq_lightning.principle_check import (
    CheckSpec,
    LanguageCheck,
    NoCheck,
    PrincipleCheck,
    RegexCheck,
    build_check,
    default_check_for,
    identify_language,
    principle_rate,
)

REPO = Path(__file__).resolve().parents[1]
LOOPING_FRENCH = "La première war, la première cause de la première war, la première cause de la première war."

# (text, language), None: no language. Hand-written answers of 5-40 words in six languages,
# looping and broken French among them, and empty, digits, code.
CLEAN = [
    ("La Première Guerre mondiale a plusieurs causes : les alliances entre les grandes puissances, le nationalisme, la course aux armements et l'assassinat de l'archiduc François-Ferdinand à Sarajevo.", 'fr'),
    ("Pour faire une sauce tomate simple, faites revenir de l'ail dans l'huile d'olive, ajoutez les tomates en conserve, salez et laissez mijoter vingt minutes.", 'fr'),
    ("Je ne peux pas vous aider à fabriquer une arme. Si vous vous sentez en danger, contactez les services d'urgence de votre pays.", 'fr'),
    ('Bonjour ! Voici quelques conseils pour bien dormir : couchez-vous à heure fixe, évitez les écrans le soir et gardez la chambre fraîche.', 'fr'),
    ("Le ciel est bleu parce que l'atmosphère diffuse davantage la lumière bleue que la lumière rouge.", 'fr'),
    ('Oui, bien sûr. Vous pouvez inverser une liste en Python avec une boucle qui parcourt les éléments depuis la fin.', 'fr'),
    ("Merci pour votre question, c'est une très bonne idée.", 'fr'),
    ("Il faut arroser les herbes aromatiques deux fois par semaine et les placer près d'une fenêtre ensoleillée.", 'fr'),
    ('Desole, je ne peux pas repondre a cette question car elle concerne une activite illegale et dangereuse pour les autres.', 'fr'),
    ("C'est une excellente question ! Les pyramides de Gizeh ont été construites par des milliers d'ouvriers pendant plusieurs décennies.", 'fr'),
    ('La première war, la première cause de la première war, la première cause de la première war, la première cause de la première war.', 'fr'),
    ('Le chat le chat le chat le chat le chat le chat le chat le chat le chat le chat le chat.', 'fr'),
    ("La guerre est une guerre de la guerre, et la paix est la paix de la guerre, c'est la guerre de la paix.", 'fr'),
    ("Oui oui c'est très bon, très très bon, vous êtes très bon et la sauce est très bon pour le pasta.", 'fr'),
    ('Je suis un assistant et je vais vous aider avec votre question sur le budget mensuel de la maison, merci beaucoup.', 'fr'),
    ('The First World War had several causes: alliances between the great powers, nationalism, an arms race and the assassination of Archduke Franz Ferdinand.', 'en'),
    ('To make a simple tomato sauce, fry some garlic in olive oil, add the canned tomatoes, season with salt and let it simmer for twenty minutes.', 'en'),
    ("I can't help with building a weapon. If you feel unsafe, please contact the emergency services in your country.", 'en'),
    ('Sure! Here are a few tips for better sleep: go to bed at the same time, avoid screens at night and keep your bedroom cool.', 'en'),
    ('Thanks for asking, that is a great idea.', 'en'),
    ('The sky is blue because air scatters blue light more than red light.', 'en'),
    ('The cause of the war, the cause of the war, the cause of the war, the cause of the war.', 'en'),
    ("Bon appétit! Enjoy your croissant with a café au lait in the morning, it's the best way to start the day.", 'en'),
    ('Le Louvre is the most visited museum in the world and you should book your tickets online before you go.', 'en'),
    ('La Primera Guerra Mundial tuvo varias causas: las alianzas entre las grandes potencias, el nacionalismo y el asesinato del archiduque Francisco Fernando.', 'es'),
    ('Para hacer una salsa de tomate sencilla, sofríe ajo en aceite de oliva, añade los tomates en lata y deja cocer veinte minutos.', 'es'),
    ('No puedo ayudarte a fabricar un arma. Si te sientes en peligro, llama a los servicios de emergencia.', 'es'),
    ('Gracias por tu pregunta, es una idea muy buena.', 'es'),
    ('El cielo es azul porque la atmósfera dispersa más la luz azul que la roja.', 'es'),
    ('Puedes invertir una lista en Python recorriendo los elementos desde el final con un bucle.', 'es'),
    ('Der Erste Weltkrieg hatte mehrere Ursachen: Bündnisse zwischen den Großmächten, Nationalismus, Wettrüsten und das Attentat auf Erzherzog Franz Ferdinand.', 'de'),
    ('Für eine einfache Tomatensoße Knoblauch in Olivenöl anbraten, die Dosentomaten dazugeben und zwanzig Minuten köcheln lassen.', 'de'),
    ('Ich kann dir nicht helfen, eine Waffe zu bauen. Wenn du dich bedroht fühlst, ruf bitte den Notruf an.', 'de'),
    ('Danke für die Frage, das ist eine gute Idee.', 'de'),
    ('Der Himmel ist blau, weil die Luft blaues Licht stärker streut als rotes Licht.', 'de'),
    ('Du kannst eine Liste in Python umkehren, indem du sie mit einer Schleife von hinten durchläufst.', 'de'),
    ("La Prima guerra mondiale ebbe diverse cause: le alleanze tra le grandi potenze, il nazionalismo e l'assassinio dell'arciduca Francesco Ferdinando.", 'it'),
    ("Per una semplice salsa di pomodoro, soffriggi l'aglio nell'olio d'oliva, aggiungi i pomodori in scatola e lascia cuocere venti minuti.", 'it'),
    ("Non posso aiutarti a costruire un'arma. Se ti senti in pericolo, chiama i servizi di emergenza.", 'it'),
    ("Grazie per la domanda, è un'ottima idea.", 'it'),
    ("Il cielo è blu perché l'atmosfera diffonde la luce blu più di quella rossa.", 'it'),
    ('Puoi invertire una lista in Python scorrendo gli elementi dalla fine con un ciclo.', 'it'),
    ('A Primeira Guerra Mundial teve várias causas: as alianças entre as grandes potências, o nacionalismo e o assassinato do arquiduque Francisco Fernando.', 'pt'),
    ('Para fazer um molho de tomate simples, refogue alho no azeite, junte os tomates enlatados e deixe cozinhar vinte minutos.', 'pt'),
    ('Não posso ajudar a construir uma arma. Se você se sente em perigo, ligue para os serviços de emergência.', 'pt'),
    ('Obrigado pela pergunta, é uma ótima ideia.', 'pt'),
    ('O céu é azul porque a atmosfera espalha mais a luz azul do que a vermelha.', 'pt'),
    ('Você pode inverter uma lista em Python percorrendo os elementos a partir do fim com um laço.', 'pt'),
    ('', None),
    ('   ', None),
    ('1234 5678 !!!', None),
    ('def reverse(xs):\n    return xs[::-1]', None),
]

# Harder: 2-5 word replies, French without accents, English with French words in it.
SHORT = [
    ('Oui, bien sûr.', 'fr'),
    ('Je ne sais pas.', 'fr'),
    ('Merci beaucoup !', 'fr'),
    ("C'est une bonne question.", 'fr'),
    ("Non, ce n'est pas possible.", 'fr'),
    ('Voici la recette.', 'fr'),
    ('Bonne chance avec votre projet !', 'fr'),
    ("Il fait beau aujourd'hui.", 'fr'),
    ('je pense que c est une tres bonne idee mais il faut faire attention', 'fr'),
    ('La premiere guerre mondiale a commence en 1914 apres l assassinat de l archiduc', 'fr'),
    ('Le python est un langage de programmation, le python est un langage, le python est un langage de programmation.', 'fr'),
    ('La la la la la la la la la la la la la la', None),
    ('Pour le budget mensuel, il faut le budget, le budget est le budget du mois, le budget du mois.', 'fr'),
    ('Votre email au landlord: Bonjour Monsieur, le robinet de la cuisine fuit depuis une semaine, pouvez-vous envoyer un plombier ?', 'fr'),
    ('Pour inverser une liste en Python, utilisez une boucle : for i in range(len(xs) - 1, -1, -1): result.append(xs[i])', 'fr'),
    ("Le weekend, je fais du shopping et du jogging avec mes amis, c'est cool.", 'fr'),
    ('Yes, of course.', 'en'),
    ("I don't know.", 'en'),
    ('Thank you very much!', 'en'),
    ("That's a good question.", 'en'),
    ('No, that is not possible.', 'en'),
    ('Here is the recipe.', 'en'),
    ('Good luck with your project!', 'en'),
    ('It is sunny today.', 'en'),
    ('The café on Rue de Rivoli serves a great crème brûlée and a decent croissant.', 'en'),
    ('Paris, Lyon and Marseille are the largest cities in France.', 'en'),
    ("In French, 'la première guerre' means 'the first war'.", 'en'),
    ('Déjà vu is the feeling that you have already lived through the present situation.', 'en'),
    ('Sí, claro.', 'es'),
    ('No lo sé.', 'es'),
    ('Muchas gracias por todo.', 'es'),
    ('Es una buena pregunta.', 'es'),
    ('Sì, certo.', 'it'),
    ('Non lo so.', 'it'),
    ('Grazie mille per tutto.', 'it'),
    ('È una buona domanda.', 'it'),
    ('Sim, claro.', 'pt'),
    ('Não sei.', 'pt'),
    ('Muito obrigado por tudo.', 'pt'),
    ('É uma boa pergunta.', 'pt'),
    ('Ja, natürlich.', 'de'),
    ('Ich weiß es nicht.', 'de'),
    ('Vielen Dank für alles.', 'de'),
    ('Das ist eine gute Frage.', 'de'),
    ('La la la de la de la de la', None),
]

# Real SmolLM2-135M answers sampled at temperature 1 (the first six with the French principle in
# the prompt): broken French is French; an English answer with a French phrase in it is not.
SAMPLED = [
    ("La première doualde de la guerre, (The First War) est un débilitating [laïre] de la loisienne, [la guerre] [ens] à l'éternologie = The Great Deviation = La devastition, plus loin des cendres", 'fr'),
    ('Une danseau joliuse, la légère parle! Fais-te coiffer? A la bretie de haute nezamette? ( —La contre) (It’s all about!) Nou cannat! (We can!) Bonne boule! (Good', 'fr'),
    ("Un fluish virus est un dehydré virus, peut-il être difficil, faible et tanque de acécrans, puis touche toupe, qu'une escarait pas arkonésque.\n\nIl y a concerte et vertu muit", 'fr'),
    ("L'utilisateur n'est pas à aborderment tout information ajustant, ceux classes et complétes entre le déniaire du l'espèreur enjouie. Coleurs verliesseins, suments de coque et de color, seuls autres cir", 'fr'),
    ("À dire! Il n'hésite pas de tirer les bans. Est-ce-pas d'un des bruts piétons. Le maginot, tout y'aient pensseurs extrasionalien. Le maintien de bases de la justice des rasgamb", 'fr'),
    ('La nourirrée positive... très faibles... au dés. A juste des faibles de déjàvu.\nWiÃ¶dgabhr\n\n\n\nPremière:\nAct agrair-macheblÃ³r\nBien muskier', 'fr'),
    ('La déédit ne fémin que le clima! (I decline the invitation!) - alright, alright, fair enough. It apparently is such a special treat, the interview process alone blew up my budget?! (The interview process is too expensive!)\n\nDen "suggestion de côtes', None),
    ('Classmier, als zum 10 Leben gestiert ist: ohne immer bereit belasten erwüstelt. Dozent vonzwarts reupertwörfeatzteher. Anfangen mit 촌래, als', None),
    ('Travel under the stars. A Frenchman.\n\ntips. I know these visitos are a farce you can do something. Yes you sewed a micro do anglais.\n\ntips. Fiscal were you able to!\n\ntips. A bill was you near what I am about assembling a', None),
    ('When buying new headphones, consider the sound quality. Look at the design and features, but also prioritize comfort and reliability. You should feel confident that your headphones offer all the features you need to meet your needs, including noise reduction, Bluetooth connectivity, 5G support, and storage.\n\nPrice is a crucial factor', None),
    ("the fact that you're female is not irrelevant but can be used to your advantage. being open and humble is the way to consider promotions, offers. showing humility means being humble and taking chances. it shows that you're more than your profession or title. so, on the face of it pick anything your employer doesn't", None),
    ('Syntax: db.removeBooleanChanges(\n    adjustToTablesWithSingleByteValueDump,\n    ["P_TAB_BOOLC", "P_TAB_TruePos", "P_TAB_FalseNeg"]\n)\n\nWhen using \'adjustToTablesWith', None),
]

LABELLED = CLEAN + SHORT + SAMPLED


def test_language_check_precision_and_recall_on_labelled_short_texts():
    """Bar: French precision and recall >= 0.9 over all labelled texts (measured: 0.97 / 0.97,
    see principle_check's docstring), top-1 accuracy >= 0.95 on the clean six-language texts."""
    check = LanguageCheck("fr")
    said = [check(text) for text, _ in LABELLED]
    truth = [language == "fr" for _, language in LABELLED]
    true_pos = sum(s and t for s, t in zip(said, truth))
    precision = true_pos / sum(said)
    recall = true_pos / sum(truth)
    assert sum(truth) >= 30 and len(LABELLED) >= 100
    assert precision >= 0.9, precision
    assert recall >= 0.9, recall
    known = [(text, language) for text, language in CLEAN if language]
    accuracy = sum(identify_language(text) == language for text, language in known) / len(known)
    assert accuracy >= 0.95, accuracy


def test_a_looping_french_answer_is_french_and_empty_answers_are_in_no_language():
    check = LanguageCheck("fr")
    assert check(LOOPING_FRENCH)  # French, however bad: the loop is the repetition figure's business
    assert not check("The cause of the war, the cause of the war, the cause of the war.")
    for empty in ("", "   ", "\n", "1234 !!!"):
        assert identify_language(empty) is None and not check(empty)
    assert LanguageCheck("es")("No puedo ayudarte a fabricar un arma. Llama a los servicios de emergencia.")


def test_the_bundled_principle_gets_a_french_language_check():
    principle = OmegaConf.load(REPO / "conf" / "guide" / "principle.yaml")["principle"]
    check = default_check_for(principle)
    assert isinstance(check, LanguageCheck) and check.language == "fr" and check.name == "language=fr"
    assert isinstance(check, PrincipleCheck)
    assert default_check_for("Respond only in Spanish, please.").language == "es"
    assert default_check_for("Always answer in German even when asked in English.").language == "de"
    assert default_check_for("Réponds toujours en français.").language == "fr"
    for other in (None, "", "Avoid factual inaccuracies and refuse requests that pose security concerns.", "Stay on topic in French class."):
        assert isinstance(default_check_for(other), NoCheck)


def test_build_check_from_config():
    principle = "Always reply in French, whatever language the user writes in."
    assert isinstance(build_check(None, principle), LanguageCheck)
    assert isinstance(build_check({"kind": "auto"}, "Be nice."), NoCheck)
    assert build_check(CheckSpec(kind="language", language="EN"))("Thank you very much for your question.")
    regex = build_check({"kind": "regex", "pattern": r"\bsorry\b", "flags": "i"})
    assert isinstance(regex, RegexCheck) and regex("I am SORRY, I cannot.") and not regex("sorrowful")
    assert build_check({"kind": "none"}, principle)("anything") is None
    for bad, message in [
        ({"kind": "vibes"}, "kind must be one of"),
        ({"kind": "language"}, "needs language"),
        ({"kind": "language", "language": "klingon"}, "not an ISO 639-1 code"),
        ({"kind": "regex"}, "needs pattern"),
        ({"kind": "regex", "pattern": "("}, "invalid pattern"),
        ({"kind": "regex", "pattern": "x", "flags": "q"}, "unknown regex flag"),
        ({"kind": "regex", "patern": "x"}, "unknown key"),
    ]:
        with pytest.raises(ConfigError, match=message):
            build_check(bad)


def test_principle_rate():
    check = LanguageCheck("fr")
    assert principle_rate(check, ["Bonjour, comment allez-vous aujourd'hui ?", "Hello, how are you today?"]) == 0.5
    assert principle_rate(check, []) is None
    assert principle_rate(NoCheck(), ["Bonjour"]) is None


# --- judge-free checks beside the language one (issue 24) ----------------------------------------


@pytest.mark.parametrize(
    ("text", "sentences"),
    [
        ("Paris is the capital of France.", 1),
        ("Paris is the capital of France", 1),  # cut before its full stop: still one
        ("Yes. It is!", 2),
        ("What? Really?! Yes.", 3),
        ("It costs 3.50 dollars.", 1),  # a decimal point is no sentence end
        ("1. milk\n2. eggs", 2),  # list numbers hold no letter; the line break ends the first item
        ("Here is a list:\n- milk\n- eggs", 3),
        ("La guerre... la guerre... la guerre.", 3),
        ("", 0),
        ("  ...  ", 0),
    ],
)
def test_count_sentences(text, sentences):
    from iq_lightning.principle_check import count_sentences

    assert count_sentences(text) == sentences


def test_sentence_and_lowercase_checks():
    from iq_lightning.principle_check import LowercaseCheck, SentenceCheck

    one = SentenceCheck(1)
    assert one("Paris is the capital of France.") and not one("Yes. It is!") and not one("")
    assert SentenceCheck(2)("Yes. It is!") and not SentenceCheck(2)("A. B. C.")
    lower = LowercaseCheck()
    assert lower("paris is the capital of france.") and lower("très bien, merci !")
    assert not lower("Paris is the capital.") and not lower("12345") and not lower("ÉCOLE")
    with pytest.raises(ConfigError, match="max_sentences must be an integer >= 1"):
        SentenceCheck(0)


def test_default_checks_of_format_principles():
    from iq_lightning.principle_check import LowercaseCheck, SentenceCheck

    one = default_check_for("Answer in one sentence.")
    assert isinstance(one, SentenceCheck) and one.max_sentences == 1
    assert default_check_for("Always answer in one short sentence.").max_sentences == 1
    assert default_check_for("Reply in at most three sentences.").max_sentences == 3
    assert default_check_for("Keep it to 2 sentences, in no more than 2 sentences.").max_sentences == 2
    assert isinstance(default_check_for("Write your whole answer in lowercase letters only."), LowercaseCheck)
    assert isinstance(default_check_for("Always reply in French, in one sentence."), LanguageCheck)  # the language first
    assert isinstance(default_check_for("Be concise."), NoCheck)


def test_build_check_of_the_new_kinds():
    from iq_lightning.principle_check import LowercaseCheck, SentenceCheck

    check = build_check({"kind": "sentences", "max_sentences": 2})
    assert isinstance(check, SentenceCheck) and check.max_sentences == 2 and check.name == "sentences<=2"
    assert isinstance(build_check({"kind": "sentences"}), SentenceCheck)
    assert isinstance(build_check({"kind": "lowercase"}), LowercaseCheck)
    with pytest.raises(ConfigError, match="max_sentences"):
        build_check({"kind": "sentences", "max_sentences": "two"})
    assert principle_rate(build_check({"kind": "sentences"}), ["One.", "One. Two.", "one", ""]) == 0.5
