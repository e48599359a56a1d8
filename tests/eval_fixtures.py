"""Tiny benchmark files in each release's layout and columns, with small PNGs embedded as {bytes, path}."""

from __future__ import annotations

import io
import os
from typing import Dict, List

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def png(color=(200, 30, 30), size=(28, 28)) -> Dict:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": "img.png"}


def write(path: str, rows: List[Dict]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _vista_meta(task: str, skills: List[str]) -> Dict:
    # the release's metadata struct (fewer keys than the release: only the ones avar reads, plus two)
    return dict(task=task, skills=skills, category="math-targeted-vqa", language="english")


def mathvista(root: str) -> str:
    rows = [
        dict(
            pid="1",
            question="Angle?",
            image="images/1.jpg",
            decoded_image=png(),
            choices=["30°", "45°", "60°"],
            unit=None,
            precision=None,
            answer="45°",
            question_type="multi_choice",
            answer_type="text",
            query="Hint: answer with the option letter.\nQuestion: Angle?\nChoices:\n(A) 30°\n(B) 45°\n(C) 60°",
            metadata=_vista_meta("geometry problem solving", ["geometry reasoning", "algebraic reasoning"]),
        ),
        dict(
            pid="2",
            question="Length?",
            image="images/2.jpg",
            decoded_image=png((0, 200, 0)),
            choices=None,
            unit="cm",
            precision=2.0,
            answer="2.44",
            question_type="free_form",
            answer_type="float",
            query="Hint: a floating-point number with two decimal places.\nQuestion: Length?",
            metadata=_vista_meta("geometry problem solving", ["geometry reasoning"]),
        ),
        dict(
            pid="3",
            question="How many?",
            image="images/3.jpg",
            decoded_image=png((0, 0, 200)),
            choices=None,
            unit=None,
            precision=None,
            answer="7",
            question_type="free_form",
            answer_type="integer",
            query="Hint: an integer.\nQuestion: How many?",
            metadata=_vista_meta("visual question answering", ["arithmetic reasoning"]),
        ),
    ]
    write(os.path.join(root, "data", "testmini-00000-of-00001.parquet"), rows)
    return root


def mathvision(root: str) -> str:
    rows = [
        dict(
            id="1",
            question="<image1>\nWhich shape?",
            options=["A", "B", "C", "D", "E"],
            image="images/1.jpg",
            decoded_image=png(),
            answer="C",
            solution=None,
            level=2,
            subject="metric geometry - angle",
        ),
        dict(
            id="2",
            question="<image1>\nCompute the area.",
            options=[],
            image="images/2.jpg",
            decoded_image=png(),
            answer="2\\sqrt{3}",
            solution=None,
            level=3,
            subject="metric geometry - area",
        ),
    ]
    write(os.path.join(root, "data", "test-00000-of-00001-abc.parquet"), rows)
    return root


def mathverse(root: str) -> str:
    common = dict(metadata=None, question_for_eval="q")
    rows = [
        dict(
            sample_index="1",
            problem_index="1",
            problem_version="Vision Only",
            question="",
            image=png(),
            answer="B",
            question_type="multi-choice",
            query_cot="According to the image, answer. Choices in image.",
            query_wo="Directly: According to the image, answer. Choices in image.",
            **common,
        ),
        dict(
            sample_index="2",
            problem_index="1",
            problem_version="Text Dominant",
            question="full text",
            image=png(),
            answer="B",
            question_type="multi-choice",
            query_cot="Text dominant prompt",
            query_wo="Directly: Text dominant prompt",
            **common,
        ),
        dict(
            sample_index="3",
            problem_index="2",
            problem_version="Vision Only",
            question="",
            image=png(),
            answer="\\frac{1}{2}",
            question_type="free-form",
            query_cot="Solve the problem in the image.",
            query_wo="Directly: Solve the problem in the image.",
            **common,
        ),
        dict(
            sample_index="4",
            problem_index="3",
            problem_version="Vision Only",
            question="",
            image=png(),
            answer="5 cm",
            question_type="multi-choice",
            query_cot="Pick the right length.",
            query_wo="Directly: Pick the right length.",
            **common,
        ),
    ]
    write(os.path.join(root, "testmini.parquet"), rows)
    return root


def _mmmu_row(i: int, **extra) -> Dict:
    row = dict(
        id="validation_Art_%d" % i,
        question="<image 1> Which period?",
        options="['Baroque', 'Gothic', 'Modern']",
        explanation="",
        image_1=png(),
        image_2=None,
        image_3=None,
        image_4=None,
        image_5=None,
        image_6=None,
        image_7=None,
        img_type="['Paintings']",
        answer="B",
        topic_difficulty="Easy",
        question_type="multiple-choice",
        subfield="Art History",
    )
    row.update(extra)
    return row


def mmmu(root: str) -> str:
    write(os.path.join(root, "Art", "validation-00000-of-00001.parquet"), [_mmmu_row(1), _mmmu_row(2, image_2=png())])
    write(
        os.path.join(root, "Math", "validation-00000-of-00001.parquet"),
        [
            _mmmu_row(
                3,
                id="validation_Math_3",
                question="<image 1> x = ?",
                options="[]",
                answer="['24', '24.0']",
                question_type="open",
            )
        ],
    )
    write(os.path.join(root, "Math", "dev-00000-of-00001.parquet"), [_mmmu_row(9, id="dev_Math_9")])
    return root


def _pro_row(i: int, subject: str, options: List[str], answer: str) -> Dict:
    return dict(
        id="test_%s_%d" % (subject, i),
        question="<image 1> Pick one (%d)." % i,
        options=str(options),
        explanation="",
        image_1=png(),
        image_2=None,
        image_3=None,
        image_4=None,
        image_5=None,
        image_6=None,
        image_7=None,
        img_type="['x']",
        answer=answer,
        topic_difficulty="Hard",
        subject=subject,
    )


def mmmu_pro(root: str) -> str:
    """The three configs of the release: the same two questions with 10 and with 4 options, and as screenshots."""
    ten = ["opt%d" % i for i in range(10)]
    write(
        os.path.join(root, "standard (10 options)", "test-00000-of-00001.parquet"),
        [_pro_row(1, "Art", ten, "J"), _pro_row(2, "Art_Theory", ten, "C")],
    )
    write(
        os.path.join(root, "standard (4 options)", "test-00000-of-00001.parquet"),
        [_pro_row(1, "Art", ["opt0", "opt3", "opt9", "opt5"], "C"), _pro_row(2, "Art_Theory", ten[:4], "C")],
    )
    write(
        os.path.join(root, "vision", "test-00000-of-00001.parquet"),
        [
            dict(id="test_Art_1", image=png(), options=str(ten), answer="J", subject="Art"),
            dict(id="test_Art_Theory_2", image=png(), options=str(ten), answer="C", subject="Art_Theory"),
        ],
    )
    return root


def mmstar(root: str) -> str:
    rows = [
        dict(
            index=0,
            question="What color?\nOptions: A: red, B: green, C: blue, D: black",
            image=png(),
            answer="A",
            category="coarse perception",
            l2_category="image scene",
            meta_info=None,
        ),
        dict(
            index=1,
            question="How many dots?\nOptions: A: 1, B: 2, C: 3, D: 4",
            image=png(),
            answer="D",
            category="fine-grained perception",
            l2_category="counting",
            meta_info=None,
        ),
    ]
    write(os.path.join(root, "mmstar.parquet"), rows)
    return root


# (category, subcategory, set_id, figure_id, question_id, gt_answer, visual_input): a VD set of two figures × two
# questions, and a VS set whose question 0 is asked without the figure (figure_id 0, in non_image) and with it
# (figure_id 1); as in the release, the questions asked without a figure are the non_image split
HALLUSION_KEYS = [
    ("VD", "illusion", "0", "0", "0", "1", "1"),
    ("VD", "illusion", "0", "0", "1", "0", "1"),
    ("VD", "illusion", "0", "1", "0", "0", "2"),
    ("VD", "illusion", "0", "1", "1", "1", "2"),
    ("VS", "chart", "1", "1", "0", "0", "1"),
    ("VS", "chart", "1", "0", "0", "1", "0"),
]


def hallusionbench(root: str) -> str:
    rows = []
    for category, sub, set_id, figure_id, question_id, gt, visual in HALLUSION_KEYS:
        rows.append(
            dict(
                category=category,
                subcategory=sub,
                visual_input=visual,
                set_id=set_id,
                figure_id=figure_id,
                sample_note="",
                question_id=question_id,
                question="Is the left line longer? (%s/%s/%s)" % (category, figure_id, question_id),
                gt_answer_details="",
                gt_answer=gt,
                filename=None,
                image=png() if visual != "0" else None,
            )
        )
    write(os.path.join(root, "data", "image-00000-of-00001.parquet"), [r for r in rows if r["visual_input"] != "0"])
    write(os.path.join(root, "data", "non_image-00000-of-00001.parquet"), [r for r in rows if r["visual_input"] == "0"])
    return root


WRITERS = {
    "mathvista": mathvista,
    "mathvision": mathvision,
    "mathverse": mathverse,
    "mmmu": mmmu,
    "mmmu_pro": mmmu_pro,
    "mmstar": mmstar,
    "hallusionbench": hallusionbench,
}


def write_all(root: str) -> Dict[str, str]:
    """Every benchmark under root/<name>; returns name -> folder."""
    return {name: writer(os.path.join(root, name)) for name, writer in WRITERS.items()}
